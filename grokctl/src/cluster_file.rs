//! The cluster config file (TOML) and its precedence: file < command-line flags < environment.
//!
//! ```toml
//! [model]
//! path = "/models/grok-1"            # GROK_MODEL
//! tokenizer = "/models/grok-1/tokenizer.model"   # GROK_TOKENIZER (optional)
//!
//! [layout]
//! tp = 8                              # GROK_TP
//! ep = 8                              # GROK_EP
//! pp = 1                              # GROK_PP
//! replicas = 1                        # GROK_REPLICAS (each tp*pp workers)
//!
//! [coordinator]
//! listen = "0.0.0.0:50051"            # GROK_LISTEN
//! http_listen = "0.0.0.0:8000"        # GROK_HTTP_LISTEN (optional)
//! api_token_file = "/etc/grok/token"  # bearer token of the client APIs (or GROK_API_TOKEN)
//!
//! [limits]
//! kv_blocks = 512                     # GROK_KV_BLOCKS (default: what each worker's memory holds)
//! max_seqs = 64                       # GROK_MAX_SEQS
//! max_queue = 256                     # GROK_MAX_QUEUE
//! max_batch_tokens = 512              # GROK_MAX_BATCH_TOKENS
//!
//! [launch]                            # `grokctl launch` (ssh to the hosts)
//! ssh_options = ["-i", "/root/.ssh/grok"]   # GROK_SSH_OPTIONS (whitespace-separated)
//! log_dir = "/var/log/grok"           # remote logs (default /tmp)
//!
//! [tls]                               # mutual TLS; all three or none (`grokctl certs`)
//! ca = "/etc/grok/certs/ca.pem"       # GROK_TLS_CA
//! cert = "/etc/grok/certs/node.pem"   # GROK_TLS_CERT
//! key = "/etc/grok/certs/node.key"    # GROK_TLS_KEY
//!
//! [etcd]                              # membership in etcd (optional)
//! endpoints = "http://10.0.0.1:2379"  # GROK_ETCD
//! cluster = "prod"                    # GROK_CLUSTER
//! user = "grok"                       # GROK_ETCD_USER
//! password_file = "/etc/grok/etcd-password"   # or GROK_ETCD_PASSWORD (the password)
//! ca = "/etc/grok/etcd-ca.pem"        # GROK_ETCD_CA
//!
//! [[hosts]]                           # for multi-host launch
//! name = "node1"
//! address = "10.0.0.2"
//! devices = ["cuda:0", "cuda:1"]
//! ssh = "admin@node1"                 # ssh target (default: address)
//! bin_dir = "/opt/grok/bin"           # grok binaries there (default /usr/local/bin)
//! ```
//! `deploy/cluster.example.toml` is a commented example. Unknown keys are errors.
//! `GROK_SSH` names the ssh program `grokctl launch` runs (default `ssh`).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub layout: LayoutSection,
    #[serde(default)]
    pub coordinator: CoordinatorSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub launch: LaunchSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub etcd: EtcdSection,
    #[serde(default)]
    pub hosts: Vec<HostSection>,
}

/// Mutual TLS between the coordinator and the workers: the cluster's CA and the certificate
/// and key the started processes present (the same paths on every host).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The TLS files, each resolved file < flags < environment (`GROK_TLS_CA`, `GROK_TLS_CERT`,
/// `GROK_TLS_KEY`). Whether the set is complete is checked by the caller
/// ([`grok_proto::tls::TlsPaths::check_member`] or `check_client`).
pub fn resolve_tls(
    file: &ClusterFile,
    flags: &grok_proto::tls::TlsPaths,
    env: &dyn Fn(&str) -> Option<String>,
) -> grok_proto::tls::TlsPaths {
    let pick = |var: &str, flag: &Option<PathBuf>, conf: &Option<PathBuf>| {
        env(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or(flag.clone())
            .or(conf.clone())
    };
    grok_proto::tls::TlsPaths::new(
        pick("GROK_TLS_CA", &flags.ca, &file.tls.ca),
        pick("GROK_TLS_CERT", &flags.cert, &file.tls.cert),
        pick("GROK_TLS_KEY", &flags.key, &file.tls.key),
    )
}

/// How `grokctl launch` reaches the hosts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSection {
    /// Extra ssh arguments, put before the target on every ssh call.
    pub ssh_options: Option<Vec<String>>,
    /// Where the started processes write their logs on each host (default /tmp).
    pub log_dir: Option<PathBuf>,
}

/// The resolved `[launch]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSettings {
    pub ssh_options: Vec<String>,
    pub log_dir: PathBuf,
}

/// `[launch]` with the environment applied: `GROK_SSH_OPTIONS` (whitespace-separated; set,
/// even empty, it replaces `ssh_options`).
pub fn resolve_launch(
    file: &ClusterFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<LaunchSettings, ConfigFileError> {
    let ssh_options = match env("GROK_SSH_OPTIONS") {
        Some(v) => v.split_whitespace().map(String::from).collect(),
        None => file.launch.ssh_options.clone().unwrap_or_default(),
    };
    let log_dir = file
        .launch
        .log_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    if !log_dir.is_absolute() {
        return Err(ConfigFileError::Invalid {
            key: "launch.log_dir".into(),
            why: format!("`{}` is not an absolute path", log_dir.display()),
        });
    }
    Ok(LaunchSettings {
        ssh_options,
        log_dir,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSection {
    pub tp: Option<usize>,
    pub ep: Option<usize>,
    pub pp: Option<usize>,
    pub replicas: Option<usize>,
    pub dp_attention: Option<bool>,
    pub expert_copies: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    pub listen: Option<String>,
    pub http_listen: Option<String>,
    /// File holding the bearer token of the client APIs (on the coordinator's host).
    pub api_token_file: Option<PathBuf>,
}

/// Membership in etcd (`--etcd` and friends of grok-coordinator and grok-worker).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// `URL[,URL...]`
    pub endpoints: Option<String>,
    pub cluster: Option<String>,
    pub user: Option<String>,
    /// File whose first line is the password (paths on the hosts).
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl ClusterFile {
    /// The flags that carry the file's `[etcd]` section and token file to the processes
    /// started from it: (coordinator's, worker's). Environment beats file: with `inherit`
    /// (local children, which inherit the environment) a setting whose variable is set is
    /// left out; without (remote processes) the variable's value is passed instead. The
    /// password variable is never put on a command line.
    pub fn process_args(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        inherit: bool,
    ) -> (Vec<String>, Vec<String>) {
        let e = &self.etcd;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let etcd: Vec<(&str, &str, Option<String>)> = vec![
            ("--etcd", "GROK_ETCD", e.endpoints.clone()),
            ("--cluster", "GROK_CLUSTER", e.cluster.clone()),
            ("--etcd-user", "GROK_ETCD_USER", e.user.clone()),
            (
                "--etcd-password-file",
                "GROK_ETCD_PASSWORD",
                path(&e.password_file),
            ),
            ("--etcd-ca", "GROK_ETCD_CA", path(&e.ca)),
        ];
        let pick = |var: &str, v: Option<String>| match env(var) {
            Some(_) if inherit || var == "GROK_ETCD_PASSWORD" => None,
            Some(e) => Some(e),
            None => v,
        };
        let mut worker = Vec::new();
        for (flag, var, v) in etcd {
            if let Some(v) = pick(var, v) {
                worker.push(flag.to_string());
                worker.push(v);
            }
        }
        let mut coordinator = worker.clone();
        if let (None, Some(t)) = (
            env("GROK_API_TOKEN"),
            path(&self.coordinator.api_token_file),
        ) {
            coordinator.push("--api-token-file".into());
            coordinator.push(t);
        }
        (coordinator, worker)
    }

    /// Whether the processes join through etcd (file or GROK_ETCD).
    pub fn uses_etcd(&self, env: &dyn Fn(&str) -> Option<String>) -> bool {
        env("GROK_ETCD").is_some() || self.etcd.endpoints.is_some()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub kv_blocks: Option<usize>,
    pub max_seqs: Option<usize>,
    pub max_queue: Option<usize>,
    pub max_batch_tokens: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub devices: Vec<String>,
    pub ssh: Option<String>,
    pub bin_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("config {path}: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("{key}: {why}")]
    Invalid { key: String, why: String },
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read {
            path: path.into(),
            why: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigFileError> {
        toml::from_str(text).map_err(|e| ConfigFileError::Parse {
            path: path.into(),
            why: e.to_string().trim().replace('\n', " "),
        })
    }
}

/// Values given on the command line (None = not given).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct UpFlags {
    /// Model directory [env: GROK_MODEL]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tensor-parallel ranks per stage [default: 1] [env: GROK_TP]
    #[arg(long)]
    pub tp: Option<usize>,
    /// Expert groups per stage [default: 1] [env: GROK_EP]
    #[arg(long)]
    pub ep: Option<usize>,
    /// Pipeline stages [default: 1] [env: GROK_PP]
    #[arg(long)]
    pub pp: Option<usize>,
    /// Model replicas, each tp*pp workers [default: 1] [env: GROK_REPLICAS]
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Data-parallel attention with expert parallelism: --ep workers per replica, each running
    /// attention for its own sequences and holding whole experts; --tp defaults to --ep
    /// [env: GROK_DP_ATTENTION=true]
    #[arg(long)]
    pub dp_attention: bool,
    /// Copies of each expert over the ranks, round-robin (with --dp-attention) [default: 1]
    /// [env: GROK_EXPERT_COPIES]
    #[arg(long)]
    pub expert_copies: Option<usize>,
    /// Coordinator address; port 0 picks a free one [default: 127.0.0.1:50051] [env: GROK_LISTEN]
    #[arg(long)]
    pub listen: Option<String>,
    /// SentencePiece tokenizer.model [env: GROK_TOKENIZER]
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// KV cache blocks per worker, 16 tokens each [default: what each worker's memory holds: 512 blocks on a CPU, --kv-memory-fraction of a GPU] [env: GROK_KV_BLOCKS]
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Serve the OpenAI-compatible HTTP API, /health, /ready and /metrics here [env: GROK_HTTP_LISTEN]
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Requests waiting beyond this are refused at once [env: GROK_MAX_QUEUE]
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// Sequences in the running batch [env: GROK_MAX_SEQS]
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// Tokens per step, the chunked-prefill budget [env: GROK_MAX_BATCH_TOKENS]
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
}

/// The resolved settings of `grokctl up`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpSettings {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub tp: usize,
    pub ep: usize,
    pub pp: usize,
    pub replicas: usize,
    pub dp_attention: bool,
    pub expert_copies: usize,
    pub listen: String,
    pub http_listen: Option<String>,
    /// None: each worker sizes its KV cache from its memory.
    pub kv_blocks: Option<usize>,
    pub max_seqs: Option<usize>,
    pub max_queue: Option<usize>,
    pub max_batch_tokens: Option<usize>,
}

fn env_usize(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<usize>, ConfigFileError> {
    match env(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ConfigFileError::Invalid {
                key: name.into(),
                why: format!("`{v}` is not a non-negative integer"),
            }),
    }
}

fn check_addr(key: &str, v: &str) -> Result<(), ConfigFileError> {
    v.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| ConfigFileError::Invalid {
            key: key.into(),
            why: format!("`{v}` is not an IP:PORT address"),
        })
}

/// Resolves file < flags < environment (`env` looks variables up, e.g. `std::env::var`).
pub fn resolve_up(
    file: &ClusterFile,
    flags: &UpFlags,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpSettings, ConfigFileError> {
    let pick_u = |e: Option<usize>, f: Option<usize>, c: Option<usize>| e.or(f).or(c);
    let model = env("GROK_MODEL")
        .map(PathBuf::from)
        .or(flags.model.clone())
        .or(file.model.path.clone())
        .ok_or_else(|| ConfigFileError::Invalid {
            key: "model.path".into(),
            why: "no model: set model.path in the config, --model, or GROK_MODEL".into(),
        })?;
    let listen = env("GROK_LISTEN")
        .or(flags.listen.clone())
        .or(file.coordinator.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let listen_key = if env("GROK_LISTEN").is_some() {
        "GROK_LISTEN"
    } else if flags.listen.is_some() {
        "--listen"
    } else {
        "coordinator.listen"
    };
    check_addr(listen_key, &listen)?;
    let http_listen = env("GROK_HTTP_LISTEN")
        .or(flags.http_listen.clone())
        .or(file.coordinator.http_listen.clone());
    if let Some(h) = &http_listen {
        check_addr("coordinator.http_listen", h)?;
    }
    let dp_attention = match env("GROK_DP_ATTENTION") {
        Some(v) => match v.trim() {
            "1" | "true" => true,
            "0" | "false" | "" => false,
            _ => {
                return Err(ConfigFileError::Invalid {
                    key: "GROK_DP_ATTENTION".into(),
                    why: format!("`{v}` is not true, false, 1 or 0"),
                })
            }
        },
        None => flags.dp_attention || file.layout.dp_attention.unwrap_or(false),
    };
    let ep = pick_u(env_usize(env, "GROK_EP")?, flags.ep, file.layout.ep).unwrap_or(1);
    let s = UpSettings {
        model,
        tokenizer: env("GROK_TOKENIZER")
            .map(PathBuf::from)
            .or(flags.tokenizer.clone())
            .or(file.model.tokenizer.clone()),
        // With data-parallel attention the ep ranks are the workers.
        tp: pick_u(env_usize(env, "GROK_TP")?, flags.tp, file.layout.tp)
            .unwrap_or(if dp_attention { ep } else { 1 }),
        ep,
        dp_attention,
        expert_copies: pick_u(
            env_usize(env, "GROK_EXPERT_COPIES")?,
            flags.expert_copies,
            file.layout.expert_copies,
        )
        .unwrap_or(1),
        pp: pick_u(env_usize(env, "GROK_PP")?, flags.pp, file.layout.pp).unwrap_or(1),
        replicas: pick_u(
            env_usize(env, "GROK_REPLICAS")?,
            flags.replicas,
            file.layout.replicas,
        )
        .unwrap_or(1),
        listen,
        http_listen,
        kv_blocks: pick_u(
            env_usize(env, "GROK_KV_BLOCKS")?,
            flags.kv_blocks,
            file.limits.kv_blocks,
        ),
        max_seqs: pick_u(
            env_usize(env, "GROK_MAX_SEQS")?,
            flags.max_seqs,
            file.limits.max_seqs,
        ),
        max_queue: pick_u(
            env_usize(env, "GROK_MAX_QUEUE")?,
            flags.max_queue,
            file.limits.max_queue,
        ),
        max_batch_tokens: pick_u(
            env_usize(env, "GROK_MAX_BATCH_TOKENS")?,
            flags.max_batch_tokens,
            file.limits.max_batch_tokens,
        ),
    };
    for (k, v) in [
        ("layout.tp", s.tp),
        ("layout.ep", s.ep),
        ("layout.pp", s.pp),
        ("layout.replicas", s.replicas),
        ("layout.expert_copies", s.expert_copies),
        ("limits.kv_blocks", s.kv_blocks.unwrap_or(1)),
    ] {
        if v == 0 {
            return Err(ConfigFileError::Invalid {
                key: k.into(),
                why: "must be at least 1".into(),
            });
        }
    }
    for (i, h) in file.hosts.iter().enumerate() {
        if h.address.parse::<std::net::IpAddr>().is_err() && h.address.is_empty() {
            return Err(ConfigFileError::Invalid {
                key: format!("hosts[{i}].address"),
                why: "empty address".into(),
            });
        }
        for d in &h.devices {
            if !(d == "cpu"
                || d.strip_prefix("cuda:")
                    .is_some_and(|n| n.parse::<u32>().is_ok()))
            {
                return Err(ConfigFileError::Invalid {
                    key: format!("hosts[{i}].devices"),
                    why: format!("`{d}` is not `cpu` or `cuda:N`"),
                });
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[model]\npath = \"/m/file\"\n[layout]\ntp = 2\npp = 2\n[coordinator]\nlisten = \"127.0.0.1:7000\"\n[limits]\nkv_blocks = 100\n";

    #[test]
    fn etcd_and_token_settings_reach_the_processes() {
        let f = ClusterFile::parse(
            "[coordinator]\napi_token_file = \"/etc/grok/token\"\n[etcd]\nendpoints = \"http://10.0.0.1:2379\"\ncluster = \"prod\"\nuser = \"grok\"\npassword_file = \"/etc/grok/etcd-password\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let none = |_: &str| None;
        assert!(f.uses_etcd(&none));
        let (c, w) = f.process_args(&none, false);
        assert_eq!(
            w,
            [
                "--etcd",
                "http://10.0.0.1:2379",
                "--cluster",
                "prod",
                "--etcd-user",
                "grok",
                "--etcd-password-file",
                "/etc/grok/etcd-password"
            ]
        );
        assert_eq!(&c[w.len()..], ["--api-token-file", "/etc/grok/token"]);
        // The environment wins: inherited by local children, passed on to remote ones; the
        // password itself never goes on a command line.
        let env = |k: &str| match k {
            "GROK_CLUSTER" => Some("staging".to_string()),
            "GROK_ETCD_PASSWORD" => Some("s3cret".to_string()),
            _ => None,
        };
        let (_, local) = f.process_args(&env, true);
        assert!(!local.contains(&"--cluster".to_string()), "{local:?}");
        let (_, remote) = f.process_args(&env, false);
        assert!(
            remote.windows(2).any(|p| p == ["--cluster", "staging"]),
            "{remote:?}"
        );
        assert!(!remote
            .iter()
            .any(|a| a.contains("s3cret") || a == "--etcd-password-file"));
        let e = ClusterFile::parse("[etcd]\nendpoint = \"x\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `endpoint`"), "{e}");
    }

    #[test]
    fn precedence_is_file_then_flags_then_environment() {
        let f = ClusterFile::parse(FILE, Path::new("c.toml")).unwrap();
        let none = |_: &str| None;
        let s = resolve_up(&f, &UpFlags::default(), &none).unwrap();
        assert_eq!(
            (
                s.model.to_str().unwrap(),
                s.tp,
                s.pp,
                s.kv_blocks,
                s.listen.as_str()
            ),
            ("/m/file", 2, 2, Some(100), "127.0.0.1:7000")
        );
        let flags = UpFlags {
            tp: Some(4),
            model: Some("/m/flag".into()),
            ..Default::default()
        };
        let s = resolve_up(&f, &flags, &none).unwrap();
        assert_eq!((s.model.to_str().unwrap(), s.tp, s.pp), ("/m/flag", 4, 2));
        let env = |k: &str| match k {
            "GROK_TP" => Some("1".to_string()),
            "GROK_MODEL" => Some("/m/env".to_string()),
            _ => None,
        };
        let s = resolve_up(&f, &flags, &env).unwrap();
        assert_eq!((s.model.to_str().unwrap(), s.tp, s.pp), ("/m/env", 1, 2));
    }

    #[test]
    fn invalid_files_name_the_key() {
        let e = ClusterFile::parse("[layout]\ntpp = 2\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `tpp`"), "{e}");
        let e = ClusterFile::parse("[modle]\npath = \"x\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `modle`"), "{e}");
        let f = ClusterFile::parse(
            "[coordinator]\nlisten = \"nowhere\"\n[model]\npath = \"/m\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let e = resolve_up(&f, &UpFlags::default(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("coordinator.listen") && e.contains("nowhere"),
            "{e}"
        );
        let f = ClusterFile::parse("[layout]\ntp = 2\n", Path::new("c.toml")).unwrap();
        let e = resolve_up(&f, &UpFlags::default(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.path"), "{e}");
        let e = resolve_up(
            &ClusterFile::parse(FILE, Path::new("c")).unwrap(),
            &UpFlags::default(),
            &|k| (k == "GROK_TP").then(|| "two".to_string()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("GROK_TP") && e.contains("two"), "{e}");
        let f = ClusterFile::parse("[model]\npath = \"/m\"\n[[hosts]]\nname = \"a\"\naddress = \"10.0.0.2\"\ndevices = [\"gpu0\"]\n", Path::new("c")).unwrap();
        let e = resolve_up(&f, &UpFlags::default(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hosts[0].devices"), "{e}");
    }

    #[test]
    fn tls_section_precedence_and_partial_sets() {
        use grok_proto::tls::TlsPaths;
        let none = |_: &str| None;
        let f = ClusterFile::parse(
            "[tls]\nca = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\nkey = \"/c/n.key\"\n",
            Path::new("c"),
        )
        .unwrap();
        let t = resolve_tls(&f, &TlsPaths::default(), &none);
        assert_eq!(t.ca.as_deref(), Some(Path::new("/c/ca.pem")));
        assert!(t.check_member().unwrap());
        let flags = TlsPaths::new(None, Some("/f/n.pem".into()), None);
        let env = |k: &str| (k == "GROK_TLS_CERT").then(|| "/e/n.pem".to_string());
        assert_eq!(
            resolve_tls(&f, &flags, &none).cert.as_deref(),
            Some(Path::new("/f/n.pem"))
        );
        assert_eq!(
            resolve_tls(&f, &flags, &env).cert.as_deref(),
            Some(Path::new("/e/n.pem"))
        );
        // A partial set (a file or flags without the key) names what is missing.
        let f = ClusterFile::parse(
            "[tls]\nca = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\n",
            Path::new("c"),
        )
        .unwrap();
        let e = resolve_tls(&f, &TlsPaths::default(), &none)
            .check_member()
            .unwrap_err();
        assert!(
            e.is_usage() && e.to_string().starts_with("--tls-key is missing"),
            "{e}"
        );
        assert!(
            !resolve_tls(&ClusterFile::default(), &TlsPaths::default(), &none)
                .check_member()
                .unwrap()
        );
        let e = ClusterFile::parse("[tls]\ncrt = \"x\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `crt`"), "{e}");
    }

    #[test]
    fn launch_section_and_its_environment_override() {
        let none = |_: &str| None;
        let f = ClusterFile::parse(FILE, Path::new("c")).unwrap();
        let l = resolve_launch(&f, &none).unwrap();
        assert_eq!(l.ssh_options, Vec::<String>::new());
        assert_eq!(l.log_dir, Path::new("/tmp"));
        let f = ClusterFile::parse(
            "[launch]\nssh_options = [\"-i\", \"/k/id\", \"-o\", \"Port=2222\"]\nlog_dir = \"/var/log/grok\"\n",
            Path::new("c"),
        )
        .unwrap();
        let l = resolve_launch(&f, &none).unwrap();
        assert_eq!(l.ssh_options, ["-i", "/k/id", "-o", "Port=2222"]);
        assert_eq!(l.log_dir, Path::new("/var/log/grok"));
        let env = |k: &str| (k == "GROK_SSH_OPTIONS").then(|| " -p  22\t-v ".to_string());
        assert_eq!(
            resolve_launch(&f, &env).unwrap().ssh_options,
            ["-p", "22", "-v"]
        );
        let empty = |k: &str| (k == "GROK_SSH_OPTIONS").then(String::new);
        assert!(resolve_launch(&f, &empty).unwrap().ssh_options.is_empty());
        let e = ClusterFile::parse("[launch]\nssh_opts = [\"-v\"]\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `ssh_opts`"), "{e}");
        let e = ClusterFile::parse("[launch]\nssh_options = \"-v\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ssh_options"), "{e}");
        let f = ClusterFile::parse("[launch]\nlog_dir = \"logs\"\n", Path::new("c")).unwrap();
        let e = resolve_launch(&f, &none).unwrap_err().to_string();
        assert!(e.contains("launch.log_dir") && e.contains("logs"), "{e}");
    }
}
