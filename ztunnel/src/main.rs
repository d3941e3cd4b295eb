//! ztunnel binary entry point.

fn main() -> anyhow::Result<()> {
    Ok(())
}
