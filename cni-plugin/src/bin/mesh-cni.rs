//! `mesh-cni`: the chained CNI plugin. Reads the CNI environment and the network config on
//! stdin, prints the result (or the spec's error JSON) on stdout, exits 0 or 1.

use std::collections::HashMap;
use std::io::{Read, Write};

use mesh_cni::cni::plugin::{MAX_STDIN, execute};
use mesh_cni::cni::spec::{CURRENT_VERSION, CniError, code};

fn main() {
    // Non-UTF-8 variables cannot be CNI variables; ignore them.
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_STDIN as u64 + 1)
        .read_to_end(&mut stdin);
    let (stdout, exit_code) = match read {
        Ok(_) => {
            let out = execute(&env, &stdin);
            (out.stdout, out.exit_code)
        }
        Err(e) => {
            let err = CniError::new(
                code::IO,
                "cannot read the network configuration",
                e.to_string(),
            );
            (format!("{}\n", err.to_json(CURRENT_VERSION)), 1)
        }
    };
    let mut out = std::io::stdout().lock();
    // Nothing sensible is left to do if stdout is gone; the exit code still tells.
    let _ = out.write_all(stdout.as_bytes()).and_then(|()| out.flush());
    std::process::exit(exit_code);
}
