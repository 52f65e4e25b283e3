//! The hardware catalog (devices, their memory, bandwidth, peak and price) and the dtypes a
//! plan can hold the weights in.

use serde::{Deserialize, Serialize};

/// The catalog shipped with the project.
pub const BUILTIN_CATALOG: &str = include_str!("../../data/hardware.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    pub memory_gb: f64,
    pub mem_bw_gbs: f64,
    pub bf16_tflops: f64,
    pub fp8_tflops: f64,
    pub int8_tops: f64,
    pub intra_node_gbs: f64,
    pub intra_node_latency_us: f64,
    pub inter_node_gbs: f64,
    pub inter_node_latency_us: f64,
    pub price_per_hour: f64,
    pub max_per_node: usize,
    /// Fixed cost of one kernel launch / matmul call (optional; 0 when absent).
    #[serde(default)]
    pub launch_overhead_us: f64,
    /// Measured matmul throughput (bf16 weights, TFLOP/s) at `gemm_rows[i]` rows per call
    /// (`grokctl plan calibrate`); empty: the peak at any row count. A matmul with few rows
    /// (a decode batch, an expert's share of a prefill) reaches less than the peak.
    #[serde(default)]
    pub gemm_rows: Vec<f64>,
    #[serde(default)]
    pub gemm_tflops: Vec<f64>,
    /// Host time to sample one token, per logit of the vocabulary (softmax, log-probability,
    /// filtering on the sampling rank; optional, 0 when absent: negligible on a GPU).
    #[serde(default)]
    pub sample_ns_per_logit: f64,
    /// Share of `mem_bw_gbs` a batch-1 weight stream (GEMV) reaches, for bf16 (and f32)
    /// weights and for int8 (and fp8) weights: the kernels' efficiency, from this project's own
    /// runs on the card where there are any (default 1: the datasheet bandwidth).
    #[serde(default = "one")]
    pub bf16_stream_efficiency: f64,
    #[serde(default = "one")]
    pub int8_stream_efficiency: f64,
    /// Collectives as NCCL runs them on this device (`[device.nccl]`; absent: a ring of
    /// messages on the link figures above).
    #[serde(default)]
    pub nccl: super::collective::NcclModel,
}

fn one() -> f64 {
    1.0
}

impl Device {
    /// FLOP/s of one matmul call with `rows` rows, given the dtype's `peak`: the measured curve
    /// (linear between measured row counts, flat beyond them) scaled to that peak, else `peak`.
    pub fn matmul_rate(&self, peak: f64, rows: f64) -> f64 {
        let (r, t) = (&self.gemm_rows, &self.gemm_tflops);
        if r.is_empty() || r.len() != t.len() || self.bf16_tflops <= 0.0 {
            return peak;
        }
        let scale = peak / (self.bf16_tflops * 1e12);
        let at = if rows <= r[0] {
            t[0]
        } else if rows >= r[r.len() - 1] {
            t[t.len() - 1]
        } else {
            let i = r.iter().position(|&x| x >= rows).unwrap_or(r.len() - 1);
            let f = (rows - r[i - 1]) / (r[i] - r[i - 1]);
            t[i - 1] + f * (t[i] - t[i - 1])
        };
        at * 1e12 * scale
    }
}

#[derive(Debug, Deserialize)]
struct CatalogFile {
    device: Vec<Device>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read catalog {path}: {why}")]
    Catalog { path: String, why: String },
    #[error("unknown device `{name}` (known: {known})")]
    UnknownDevice { name: String, known: String },
    #[error("invalid plan input: {0}")]
    Input(String),
}

/// The hardware catalog: built-in entries, optionally extended or overridden by a user file.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub devices: Vec<Device>,
}

impl Catalog {
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_CATALOG, "built-in").expect("the built-in catalog parses")
    }

    pub fn parse(text: &str, what: &str) -> Result<Self, PlanError> {
        let f: CatalogFile = toml::from_str(text).map_err(|e| PlanError::Catalog {
            path: what.into(),
            why: e.to_string(),
        })?;
        for d in &f.device {
            if !(d.memory_gb > 0.0
                && d.mem_bw_gbs > 0.0
                && d.bf16_tflops > 0.0
                && d.max_per_node > 0)
            {
                return Err(PlanError::Catalog {
                    path: what.into(),
                    why: format!("device `{}` needs positive memory_gb, mem_bw_gbs, bf16_tflops and max_per_node", d.name),
                });
            }
        }
        Ok(Self { devices: f.device })
    }

    /// Adds (or replaces by name) the entries of `other`.
    pub fn extend(&mut self, other: Catalog) {
        for d in other.devices {
            self.devices.retain(|x| x.name != d.name);
            self.devices.push(d);
        }
    }

    pub fn get(&self, name: &str) -> Result<&Device, PlanError> {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| PlanError::UnknownDevice {
                name: name.into(),
                known: self
                    .devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Weight storage of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PlanDType {
    F32,
    Bf16,
    Int8,
    Fp8,
}

impl std::str::FromStr for PlanDType {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        Ok(match s {
            "f32" => Self::F32,
            "bf16" => Self::Bf16,
            "int8" => Self::Int8,
            "fp8" => Self::Fp8,
            o => {
                return Err(PlanError::Input(format!(
                    "unknown dtype `{o}` (f32, bf16, int8, fp8)"
                )))
            }
        })
    }
}

impl PlanDType {
    pub(super) fn quantized(self) -> bool {
        matches!(self, Self::Int8 | Self::Fp8)
    }
    /// Bytes per element of a layer matrix.
    pub(super) fn matrix_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
            Self::Int8 | Self::Fp8 => 1,
        }
    }
    /// Bytes per element of the embedding / output matrix.
    pub(super) fn embed_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }
    /// The share of the memory bandwidth a weight stream of this dtype reaches on `d`.
    pub(super) fn stream_efficiency(self, d: &Device) -> f64 {
        let e = match self {
            Self::F32 | Self::Bf16 => d.bf16_stream_efficiency,
            Self::Int8 | Self::Fp8 => d.int8_stream_efficiency,
        };
        if e > 0.0 && e <= 1.0 {
            e
        } else {
            1.0
        }
    }
    /// Peak dense throughput on `d` for this dtype's matmuls, FLOP/s.
    pub(super) fn peak(self, d: &Device) -> f64 {
        let t = match self {
            Self::F32 | Self::Bf16 => d.bf16_tflops,
            // Weight-only int8 computes in bf16 (dequantized in registers).
            Self::Int8 => d.bf16_tflops,
            Self::Fp8 => {
                if d.fp8_tflops > 0.0 {
                    d.fp8_tflops
                } else {
                    d.bf16_tflops
                }
            }
        };
        t * 1e12
    }
}
