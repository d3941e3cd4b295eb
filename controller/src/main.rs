//! mesh-controller binary (wired up in a later step).

fn main() -> anyhow::Result<()> {
    Ok(())
}
