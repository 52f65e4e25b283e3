//! Every file in deploy/ parses, and every flag it passes to a grok binary exists in that
//! binary's --help.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn help(bin: &str) -> String {
    let o = Command::new(grok_tests::bin(bin))
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success(), "{bin} --help failed");
    String::from_utf8(o.stdout).unwrap()
}

/// Flags (`--name`) passed after `bin` in a command string.
fn flags_after(cmd: &str, bin: &str) -> Vec<String> {
    // The binary as a command word (not a host name such as `grok-coordinator:50051`).
    let Some(i) = cmd.match_indices(bin).map(|(i, _)| i).find(|&i| {
        let next = cmd[i + bin.len()..].chars().next();
        next.is_none_or(|c| c.is_whitespace() || c == '"')
    }) else {
        return vec![];
    };
    cmd[i + bin.len()..]
        .split(|c: char| {
            c.is_whitespace()
                || c == '"'
                || c == '\''
                || c == ','
                || c == '['
                || c == ']'
                || c == '='
        })
        .filter(|t| t.starts_with("--") && t.len() > 2)
        .map(|t| t.to_string())
        .collect()
}

fn check_flags(cmd: &str, file: &str) -> usize {
    let mut n = 0;
    for bin in ["grok-coordinator", "grok-worker"] {
        let h = help(bin);
        for f in flags_after(cmd, bin) {
            assert!(
                h.contains(&format!("{f} ")) || h.contains(&format!("{f}\n")),
                "{file}: {bin} has no flag {f}"
            );
            n += 1;
        }
    }
    n
}

#[test]
fn kubernetes_manifests_parse_and_use_real_flags() {
    let script = r#"
import json, sys, yaml
out = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc: continue
        cmds = []
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            cmds.append(" ".join(c.get("command", []) + c.get("args", [])))
            cmds.append(json.dumps({k: v for k, v in c.items() if k.endswith("Probe")}))
        out.append({"kind": doc["kind"], "cmds": cmds})
print(json.dumps(out))
"#;
    let files: Vec<String> = std::fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .expect("python3 with PyYAML (scripts/test.sh installs it)");
    assert!(
        o.status.success(),
        "YAML does not parse: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let docs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let kinds: Vec<&str> = docs
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    for k in ["Deployment", "Service", "StatefulSet"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    let all = docs.to_string();
    assert!(
        all.contains("livenessProbe") && all.contains("readinessProbe") && all.contains("/ready")
    );
    let mut n = 0;
    for d in docs.as_array().unwrap() {
        for c in d["cmds"].as_array().unwrap() {
            n += check_flags(c.as_str().unwrap(), "k8s");
        }
    }
    assert!(n >= 8, "{n}");
}

#[test]
fn text_assets_parse_and_use_real_flags() {
    let mut n = 0;
    for f in [
        "slurm/grok.sbatch",
        "systemd/grok-coordinator.service",
        "systemd/grok-worker@.service",
        "docker/Dockerfile",
        "docker/Dockerfile.cuda",
    ] {
        let text = std::fs::read_to_string(root().join("deploy").join(f)).unwrap();
        let joined = text.replace("\\\n", " ");
        for line in joined.lines().filter(|l| !l.trim_start().starts_with('#')) {
            n += check_flags(line, f);
        }
    }
    assert!(n >= 10, "{n}");
    // The Slurm script is valid bash.
    let o = Command::new("bash")
        .arg("-n")
        .arg(root().join("deploy/slurm/grok.sbatch"))
        .output()
        .unwrap();
    assert!(o.status.success());
    // Dockerfiles: a build stage, a final stage, and COPY --from naming a real stage.
    for f in ["docker/Dockerfile", "docker/Dockerfile.cuda"] {
        let text = std::fs::read_to_string(root().join("deploy").join(f)).unwrap();
        let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(stages.len(), 2, "{f}");
        assert!(stages[0].ends_with(" AS build"), "{f}");
        assert!(text.contains("COPY --from=build "), "{f}");
        assert!(text.contains("cargo build --release --locked"), "{f}");
    }
    // systemd units have the sections systemd requires.
    for f in [
        "systemd/grok-coordinator.service",
        "systemd/grok-worker@.service",
    ] {
        let text = std::fs::read_to_string(root().join("deploy").join(f)).unwrap();
        for s in ["[Unit]", "[Service]", "[Install]", "ExecStart="] {
            assert!(text.contains(s), "{f} lacks {s}");
        }
    }
}

#[test]
fn the_example_cluster_config_is_valid() {
    let f = grokctl::cluster_file::ClusterFile::load(&root().join("deploy/cluster.example.toml"))
        .unwrap();
    let s = grokctl::cluster_file::resolve_up(&f, &Default::default(), &|_| None).unwrap();
    assert_eq!((s.tp, s.ep, s.pp), (8, 8, 1));
    assert_eq!(s.http_listen.as_deref(), Some("0.0.0.0:8000"));
    assert_eq!(f.hosts[0].devices.len(), 8);
    let l = grokctl::cluster_file::resolve_launch(&f, &|_| None).unwrap();
    assert_eq!(l.ssh_options[0], "-i");
    assert_eq!(l.log_dir, std::path::Path::new("/tmp"));
}
