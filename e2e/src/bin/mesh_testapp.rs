//! `mesh-testapp`: the mesh's test/demo workload (see `e2e::testapp`).

fn main() -> std::process::ExitCode {
    e2e::testapp::main()
}
