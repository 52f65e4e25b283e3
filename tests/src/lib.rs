//! Test support: an independent float64 reference of the Grok-1 forward pass (written from
//! GROK1_SPEC.md, sharing no code with the implementation under test) and helpers.

pub mod reference;

use std::path::PathBuf;

/// The `../shared` folder beside the project root, when present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    p.join("GROK1_SPEC.md").exists().then_some(p)
}

/// Path of a workspace binary built by cargo for the integration tests.
pub fn bin(name: &str) -> PathBuf {
    let mut p = std::env::current_exe().expect("test exe");
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    p.join(name)
}

pub mod cluster;
pub mod etcd;
pub mod netns;
