//! Model configuration: the Grok-1 preset, the small synthetic presets, and parsing of the
//! Hugging Face `config.json` variants (GROK1_SPEC.md §8.1 hpcai-tech, §8.2 SGLang, §8.3 keyfan).
//!
//! Field names follow the reference implementation (`num_q_heads`, `key_size`, ...).
//! Every `ModelConfig` that leaves this module has passed [`ModelConfig::validate`].

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Errors reading or checking a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config key `{key}` is missing (also tried: {aliases})")]
    Missing { key: &'static str, aliases: String },
    #[error("config key `{key}` has an invalid value {value}: {why}")]
    BadValue {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("inconsistent config: {0}")]
    Inconsistent(String),
    #[error("unknown preset `{0}` (known: tiny, tiny8, small, grok-1)")]
    UnknownPreset(String),
}

/// The most parameters a configuration may describe (Grok-1 has 3.2e11): with 8 bytes each the
/// byte count still fits in a u64.
const MAX_PARAMS: u64 = 1 << 56;

/// The most layers, heads or experts a configuration may have (Grok-1: 64, 48, 8, 8).
const MAX_COUNT: usize = 1 << 16;

/// The architecture hyperparameters of a Grok-1-style model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    /// d_model (`emb_size` in the reference).
    pub emb_size: usize,
    /// Expert FFN width (`ffn_size(emb_size, widening_factor)` in the reference).
    pub ffn_size: usize,
    pub num_layers: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    /// Head dimension (`key_size` = `value_size`).
    pub key_size: usize,
    pub num_experts: usize,
    pub num_selected_experts: usize,
    /// Multiplies the attention logits q·k (it is the 1/sqrt(d) scale).
    pub attn_output_multiplier: f64,
    pub embedding_multiplier_scale: f64,
    pub output_multiplier_scale: f64,
    /// Attention logit soft-cap: `cap * tanh(logit / cap)`.
    pub max_attn_value: f64,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl ModelConfig {
    /// The real Grok-1 (GROK1_SPEC.md §1-§2).
    pub fn grok1() -> Self {
        Self {
            vocab_size: 131072,
            emb_size: 6144,
            ffn_size: 32768,
            num_layers: 64,
            num_q_heads: 48,
            num_kv_heads: 8,
            key_size: 128,
            num_experts: 8,
            num_selected_experts: 2,
            attn_output_multiplier: 0.08838834764831845,
            embedding_multiplier_scale: 78.38367176906169,
            output_multiplier_scale: 0.5773502691896257,
            max_attn_value: 30.0,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            pad_token_id: 0,
            bos_token_id: 1,
            eos_token_id: 2,
        }
    }

    /// Scales of a smaller model with Grok-1's structure: the multipliers follow the widths the
    /// way Grok-1's do (embedding ×sqrt(d), logits ×1/sqrt(key_size)).
    fn scaled(
        vocab: usize,
        emb: usize,
        ffn: usize,
        layers: usize,
        q: usize,
        kv: usize,
        key: usize,
        experts: usize,
        ctx: usize,
    ) -> Self {
        Self {
            vocab_size: vocab,
            emb_size: emb,
            ffn_size: ffn,
            num_layers: layers,
            num_q_heads: q,
            num_kv_heads: kv,
            key_size: key,
            num_experts: experts,
            num_selected_experts: 2,
            attn_output_multiplier: 1.0 / (key as f64).sqrt(),
            embedding_multiplier_scale: (emb as f64).sqrt(),
            max_position_embeddings: ctx,
            ..Self::grok1()
        }
    }

    /// Named presets: `tiny` (tests), `tiny8` (tests: 8 experts, GQA group 3), `small` (CPU
    /// benchmarks, about 0.75B parameters), `grok-1` (real widths; `layers` overrides the depth).
    pub fn preset(name: &str, layers: Option<usize>) -> Result<Self, ConfigError> {
        let mut c = match name {
            "tiny" => Self::scaled(256, 64, 128, 2, 4, 2, 16, 4, 512),
            "tiny8" => Self::scaled(512, 96, 160, 3, 6, 2, 16, 8, 512),
            "small" => Self::scaled(131072, 1024, 3072, 8, 8, 2, 128, 8, 8192),
            "grok-1" | "grok1" => Self::grok1(),
            other => return Err(ConfigError::UnknownPreset(other.to_string())),
        };
        if let Some(l) = layers {
            c.num_layers = l;
        }
        c.validate()?;
        Ok(c)
    }

    pub fn q_size(&self) -> usize {
        self.num_q_heads * self.key_size
    }
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.key_size
    }
    pub fn group_size(&self) -> usize {
        self.num_q_heads / self.num_kv_heads
    }

    /// Total parameter count.
    pub fn num_params(&self) -> u64 {
        let d = self.emb_size as u64;
        let attn = d * (self.q_size() as u64) * 2 + d * (self.kv_size() as u64) * 2;
        let experts = self.num_experts as u64 * 3 * d * self.ffn_size as u64;
        let per_layer = attn + experts + d * self.num_experts as u64 + 4 * d;
        self.vocab_size as u64 * d + self.num_layers as u64 * per_layer + d
    }

    /// [`Self::num_params`] with every product checked (None on overflow).
    fn checked_num_params(&self) -> Option<u64> {
        let u = |x: usize| u64::try_from(x).ok();
        let d = u(self.emb_size)?;
        let q = u(self.num_q_heads.checked_mul(self.key_size)?)?;
        let kv = u(self.num_kv_heads.checked_mul(self.key_size)?)?;
        let attn = d
            .checked_mul(q)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)?;
        let experts = u(self.num_experts)?
            .checked_mul(3)?
            .checked_mul(d)?
            .checked_mul(u(self.ffn_size)?)?;
        let per_layer = attn
            .checked_add(experts)?
            .checked_add(d.checked_mul(u(self.num_experts)?)?)?
            .checked_add(d.checked_mul(4)?)?;
        u(self.vocab_size)?
            .checked_mul(d)?
            .checked_add(u(self.num_layers)?.checked_mul(per_layer)?)?
            .checked_add(d)
    }

    /// Parameters touched per decoded token, including the (tied) output matrix.
    pub fn active_params(&self) -> u64 {
        let d = self.emb_size as u64;
        let attn = d * (self.q_size() as u64) * 2 + d * (self.kv_size() as u64) * 2;
        let experts = self.num_selected_experts as u64 * 3 * d * self.ffn_size as u64;
        let per_layer = attn + experts + d * self.num_experts as u64 + 4 * d;
        self.vocab_size as u64 * d + self.num_layers as u64 * per_layer + d
    }

    /// Checks that the numbers describe a model this code can run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nz = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.emb_size),
            ("intermediate_size", self.ffn_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_q_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.key_size),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_selected_experts),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (k, v) in nz {
            if v == 0 {
                return Err(ConfigError::Inconsistent(format!("{k} must be positive")));
            }
        }
        if !self.num_q_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ConfigError::Inconsistent(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_q_heads, self.num_kv_heads
            )));
        }
        if !self.key_size.is_multiple_of(2) {
            return Err(ConfigError::Inconsistent(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.key_size
            )));
        }
        if self.num_selected_experts > self.num_experts {
            return Err(ConfigError::Inconsistent(format!(
                "num_experts_per_tok ({}) exceeds num_experts ({})",
                self.num_selected_experts, self.num_experts
            )));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(ConfigError::Inconsistent("vocab_size too large".into()));
        }
        // Layers, heads and experts are counted one by one (shards list their experts, names
        // are made per layer): a count read from a file must not size a huge list.
        for (k, v) in [
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_q_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("num_experts", self.num_experts),
        ] {
            if v > MAX_COUNT {
                return Err(ConfigError::Inconsistent(format!(
                    "{k} ({v}) exceeds {MAX_COUNT}"
                )));
            }
        }
        // Every size derived from these numbers (head widths, tensor sizes, the parameter count
        // and its bytes) must fit, so that no later arithmetic on a config read from a file
        // overflows.
        if self.checked_num_params().is_none_or(|n| n > MAX_PARAMS) {
            return Err(ConfigError::Inconsistent(format!(
                "the sizes describe more than 2^56 parameters (vocab_size {}, hidden_size {}, intermediate_size {}, num_hidden_layers {}, num_attention_heads {}, num_key_value_heads {}, head_dim {}, num_experts {})",
                self.vocab_size,
                self.emb_size,
                self.ffn_size,
                self.num_layers,
                self.num_q_heads,
                self.num_kv_heads,
                self.key_size,
                self.num_experts
            )));
        }
        for (k, v) in [
            ("attn_output_multiplier", self.attn_output_multiplier),
            (
                "embedding_multiplier_scale",
                self.embedding_multiplier_scale,
            ),
            ("output_multiplier_scale", self.output_multiplier_scale),
            ("max_attn_value", self.max_attn_value),
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::Inconsistent(format!(
                    "{k} must be a positive finite number, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// Reads a Hugging Face style `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_json(&v)
    }

    /// Parses the keys of the §8.1 layout, accepting the aliases of §8.2/§8.3.
    pub fn from_hf_json(v: &Value) -> Result<Self, ConfigError> {
        let g = Self::grok1();
        let emb = req_usize(v, "hidden_size", &["emb_size", "d_model"])?;
        let heads = req_usize(v, "num_attention_heads", &["num_q_heads"])?;
        let key_size = match opt_usize(v, "head_dim", &["key_size"])? {
            Some(h) => h,
            None => {
                if heads == 0 {
                    return Err(ConfigError::Inconsistent(
                        "num_attention_heads must be positive".into(),
                    ));
                }
                if emb % heads != 0 {
                    return Err(ConfigError::Inconsistent(format!(
                        "head_dim is absent and hidden_size ({emb}) is not a multiple of num_attention_heads ({heads})"
                    )));
                }
                emb / heads
            }
        };
        let c = Self {
            vocab_size: req_usize(v, "vocab_size", &[])?,
            emb_size: emb,
            ffn_size: req_usize(v, "intermediate_size", &["ffn_size"])?,
            num_layers: req_usize(v, "num_hidden_layers", &["num_layers"])?,
            num_q_heads: heads,
            num_kv_heads: opt_usize(v, "num_key_value_heads", &["num_kv_heads"])?.unwrap_or(heads),
            key_size,
            num_experts: req_usize(v, "num_experts", &["num_local_experts"])?,
            num_selected_experts: req_usize(v, "num_experts_per_tok", &["num_selected_experts"])?,
            attn_output_multiplier: opt_f64(v, "attn_output_multiplier", &[])?
                .unwrap_or(1.0 / (key_size as f64).sqrt()),
            embedding_multiplier_scale: opt_f64(v, "embedding_multiplier_scale", &[])?
                .unwrap_or(g.embedding_multiplier_scale),
            output_multiplier_scale: opt_f64(v, "output_multiplier_scale", &[])?
                .unwrap_or(g.output_multiplier_scale),
            max_attn_value: opt_f64(v, "max_attn_value", &["attn_logit_softcapping"])?
                .unwrap_or(30.0),
            max_position_embeddings: opt_usize(v, "max_position_embeddings", &["context_len"])?
                .unwrap_or(8192),
            rms_norm_eps: opt_f64(v, "rms_norm_eps", &[])?.unwrap_or(1e-5),
            rope_theta: opt_f64(v, "rope_theta", &[])?.unwrap_or(10000.0),
            pad_token_id: opt_u32(v, "pad_token_id")?.unwrap_or(0),
            bos_token_id: opt_u32(v, "bos_token_id")?.unwrap_or(1),
            eos_token_id: opt_u32(v, "eos_token_id")?.unwrap_or(2),
        };
        c.validate()?;
        Ok(c)
    }

    /// The §8.1 `config.json` for this configuration.
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["Grok1ModelForCausalLM"],
            "model_type": "grok-1",
            "vocab_size": self.vocab_size,
            "hidden_size": self.emb_size,
            "intermediate_size": self.ffn_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_q_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.key_size,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_selected_experts,
            "attn_output_multiplier": self.attn_output_multiplier,
            "embedding_multiplier_scale": self.embedding_multiplier_scale,
            "output_multiplier_scale": self.output_multiplier_scale,
            "max_attn_value": self.max_attn_value,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": true,
            "use_cache": true,
            "output_router_logits": false,
            "torch_dtype": "bfloat16",
        })
    }
}

fn lookup<'a>(
    v: &'a Value,
    key: &'static str,
    aliases: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    std::iter::once(key)
        .chain(aliases.iter().copied())
        .find_map(|k| v.get(k).filter(|x| !x.is_null()).map(|x| (k, x)))
}

/// Some converters store scalars as one-element lists (keyfan's `output_multiplier_scale`).
fn unwrap_singleton(x: &Value) -> &Value {
    match x {
        Value::Array(a) if a.len() == 1 => &a[0],
        other => other,
    }
}

fn opt_f64(
    v: &Value,
    key: &'static str,
    aliases: &[&'static str],
) -> Result<Option<f64>, ConfigError> {
    match lookup(v, key, aliases) {
        None => Ok(None),
        Some((k, x)) => {
            unwrap_singleton(x)
                .as_f64()
                .map(Some)
                .ok_or_else(|| ConfigError::BadValue {
                    key: static_key(k),
                    value: x.to_string(),
                    why: "expected a number".into(),
                })
        }
    }
}

fn opt_usize(
    v: &Value,
    key: &'static str,
    aliases: &[&'static str],
) -> Result<Option<usize>, ConfigError> {
    match lookup(v, key, aliases) {
        None => Ok(None),
        Some((k, x)) => unwrap_singleton(x)
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| ConfigError::BadValue {
                key: static_key(k),
                value: x.to_string(),
                why: "expected a non-negative integer".into(),
            }),
    }
}

/// A token id: a u32 (a larger number was silently truncated before).
fn opt_u32(v: &Value, key: &'static str) -> Result<Option<u32>, ConfigError> {
    match opt_usize(v, key, &[])? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| ConfigError::BadValue {
                key,
                value: n.to_string(),
                why: "a token id must fit in 32 bits".into(),
            }),
    }
}

fn req_usize(v: &Value, key: &'static str, aliases: &[&'static str]) -> Result<usize, ConfigError> {
    opt_usize(v, key, aliases)?.ok_or_else(|| ConfigError::Missing {
        key,
        aliases: if aliases.is_empty() {
            "none".into()
        } else {
            aliases.join(", ")
        },
    })
}

fn static_key(k: &'static str) -> &'static str {
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grok1_counts_match_spec() {
        let c = ModelConfig::grok1();
        assert_eq!(c.num_params(), 315_684_820_992);
        assert_eq!(c.active_params(), 83_756_587_008);
    }

    #[test]
    fn hf_roundtrip_and_aliases() {
        let c = ModelConfig::preset("tiny8", None).unwrap();
        assert_eq!(ModelConfig::from_hf_json(&c.to_hf_json()).unwrap(), c);
        let mut j = ModelConfig::grok1().to_hf_json();
        let o = j.as_object_mut().unwrap();
        o.remove("head_dim");
        let n = o.remove("num_experts").unwrap();
        o.insert("num_local_experts".into(), n);
        let cap = o.remove("max_attn_value").unwrap();
        o.insert("attn_logit_softcapping".into(), cap);
        o.insert(
            "output_multiplier_scale".into(),
            serde_json::json!([0.5773502691896257]),
        );
        assert_eq!(ModelConfig::from_hf_json(&j).unwrap(), ModelConfig::grok1());
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        let mut j = ModelConfig::grok1().to_hf_json();
        j["num_key_value_heads"] = 7.into();
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(e.contains("multiple of num_key_value_heads"), "{e}");
        let mut j = ModelConfig::grok1().to_hf_json();
        j.as_object_mut().unwrap().remove("vocab_size");
        assert!(matches!(
            ModelConfig::from_hf_json(&j),
            Err(ConfigError::Missing {
                key: "vocab_size",
                ..
            })
        ));
        // Zero heads and no head_dim: was a division by zero.
        let mut j = ModelConfig::grok1().to_hf_json();
        j["num_attention_heads"] = 0.into();
        j.as_object_mut().unwrap().remove("head_dim");
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads must be positive"), "{e}");
        // Sizes whose products overflow (q_size, num_params): refused, not a later panic.
        for (k, n, why) in [
            (
                "num_attention_heads",
                1u64 << 40,
                "num_attention_heads (1099511627776) exceeds",
            ),
            ("head_dim", 1u64 << 62, "more than 2^56 parameters"),
            ("intermediate_size", u64::MAX, "more than 2^56 parameters"),
            ("intermediate_size", 1u64 << 40, "more than 2^56 parameters"),
            (
                "num_hidden_layers",
                1u64 << 50,
                "num_hidden_layers (1125899906842624) exceeds",
            ),
        ] {
            let mut j = ModelConfig::grok1().to_hf_json();
            j[k] = n.into();
            if k == "num_attention_heads" {
                j["num_key_value_heads"] = n.into();
            }
            let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
            assert!(e.contains(why), "{k}: {e}");
        }
        // 2^40 experts of width 1 (few parameters): a shard listed every one of them.
        let mut j = ModelConfig::preset("tiny", None).unwrap().to_hf_json();
        j["num_experts"] = (1u64 << 40).into();
        j["hidden_size"] = 2.into();
        j["intermediate_size"] = 1.into();
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(
            e.contains("num_experts (1099511627776) exceeds 65536"),
            "{e}"
        );
        // A token id past u32 was truncated to another id.
        let mut j = ModelConfig::grok1().to_hf_json();
        j["eos_token_id"] = ((1u64 << 32) + 2).into();
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(e.contains("eos_token_id") && e.contains("32 bits"), "{e}");
        let mut j = ModelConfig::grok1().to_hf_json();
        j["hidden_size"] = "big".into();
        assert!(matches!(
            ModelConfig::from_hf_json(&j),
            Err(ConfigError::BadValue { .. })
        ));
    }
}
