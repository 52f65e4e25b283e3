//! Tensor names of the checkpoint layouts this project reads (GROK1_SPEC.md §8.1-§8.3).
//! The first name of each list is the canonical (§8.1, hpcai-tech / vLLM) one, which
//! `grokctl gen-model` writes.

fn expand(patterns: &[&str], layer: usize, expert: usize) -> Vec<String> {
    patterns
        .iter()
        .map(|p| {
            p.replace("{i}", &layer.to_string())
                .replace("{e}", &expert.to_string())
        })
        .collect()
}

pub fn embedding() -> Vec<String> {
    expand(
        &[
            "model.embed_tokens.weight",
            "transformer.in_out_embed.weight",
        ],
        0,
        0,
    )
}

pub fn final_norm() -> Vec<String> {
    expand(
        &[
            "model.norm.scale",
            "model.norm.weight",
            "transformer.rms_norm.weight",
        ],
        0,
        0,
    )
}

/// The four norms of a layer, in forward order.
#[derive(Clone, Copy, Debug)]
pub enum Norm {
    PreAttn,
    PostAttn,
    PreMoe,
    PostMoe,
}

pub fn norm(layer: usize, which: Norm) -> Vec<String> {
    let (hf, official) = match which {
        Norm::PreAttn => ("pre_attn_norm", "rms_norm"),
        Norm::PostAttn => ("post_attn_norm", "rms_norm_1"),
        Norm::PreMoe => ("pre_moe_norm", "rms_norm_2"),
        Norm::PostMoe => ("post_moe_norm", "rms_norm_3"),
    };
    vec![
        format!("model.layers.{layer}.{hf}.scale"),
        format!("model.layers.{layer}.{hf}.weight"),
        format!("transformer.decoder_layer.{layer}.{official}.weight"),
    ]
}

/// Attention projections.
#[derive(Clone, Copy, Debug)]
pub enum Proj {
    Q,
    K,
    V,
    O,
}

/// Base names (without `.weight`) of an attention projection.
pub fn attn(layer: usize, which: Proj) -> Vec<String> {
    let (hf, official) = match which {
        Proj::Q => ("q_proj", "query"),
        Proj::K => ("k_proj", "key"),
        Proj::V => ("v_proj", "value"),
        Proj::O => ("o_proj", "linear"),
    };
    vec![
        format!("model.layers.{layer}.attn.{hf}"),
        format!("model.layers.{layer}.self_attn.{hf}"),
        format!("transformer.decoder_layer.{layer}.multi_head_attention.{official}"),
    ]
}

pub fn router(layer: usize) -> Vec<String> {
    expand(
        &[
            "model.layers.{i}.moe_block.gate.weight",
            "model.layers.{i}.block_sparse_moe.gate.weight",
            "transformer.decoder_layer.{i}.router.weight",
        ],
        layer,
        0,
    )
}

/// Expert matrices: `Linear` is the GELU branch, `LinearV` the linear branch, `Linear1` down.
#[derive(Clone, Copy, Debug)]
pub enum ExpertProj {
    Linear,
    LinearV,
    Linear1,
}

/// Base names (without `.weight`) of an expert matrix.
pub fn expert(layer: usize, e: usize, which: ExpertProj) -> Vec<String> {
    let (official, sg) = match which {
        ExpertProj::Linear => ("linear", "w1"),
        ExpertProj::LinearV => ("linear_v", "w3"),
        ExpertProj::Linear1 => ("linear_1", "w2"),
    };
    vec![
        format!("model.layers.{layer}.moe_block.experts.{e}.{official}"),
        format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{sg}"),
        format!("transformer.decoder_layer.{layer}.moe.{e}.{official}"),
    ]
}

pub fn with_suffix(bases: &[String], suffix: &str) -> Vec<String> {
    bases.iter().map(|b| format!("{b}{suffix}")).collect()
}
