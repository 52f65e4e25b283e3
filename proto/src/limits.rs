//! Message-size limits, set on purpose and the same on every gRPC channel of the cluster.
//!
//! Nothing a client asks for may reach a transport limit: every message whose size grows with
//! a request (prompt logits between worker and coordinator, and from the coordinator to the
//! client) is split into chunks of at most [`CHUNK_BYTES`], and what cannot be split (a prompt
//! too long for its logits to be kept) is refused up front with INVALID_ARGUMENT naming the
//! limit. The per-message limit [`MAX_MESSAGE_BYTES`] is then far above any message the
//! cluster sends itself, and bounds what a peer can make this process allocate.

/// The most any single gRPC message may take, decoding and encoding, on every channel.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The most an HTTP request body may take (the OpenAI-compatible API).
pub const MAX_HTTP_BODY_BYTES: usize = 4 << 20;

/// The size of one chunk of a split message (logits, prompt logits).
pub const CHUNK_BYTES: usize = 1 << 20;

/// The most prompt logits one request may ask for (prompt tokens x vocabulary x 4 bytes).
pub const MAX_PROMPT_LOGITS_BYTES: usize = 256 << 20;

// A chunk, with room to spare, fits in any message of the cluster.
const _: () = assert!(CHUNK_BYTES * 4 < MAX_MESSAGE_BYTES);

/// Floats per chunk of whole rows of `width` floats: at least one row, at most
/// [`CHUNK_BYTES`] when a row fits.
pub fn rows_per_chunk(width: usize) -> usize {
    (CHUNK_BYTES / 4 / width.max(1)).max(1)
}

/// Splits `v` into chunks of at most [`CHUNK_BYTES`] (the last may be shorter; an empty `v`
/// gives no chunk).
pub fn float_chunks(v: &[f32]) -> impl Iterator<Item = &[f32]> {
    v.chunks(CHUNK_BYTES / 4)
}

/// A channel's client with the cluster's limits.
#[macro_export]
macro_rules! limited {
    ($client:expr) => {
        $client
            .max_decoding_message_size($crate::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size($crate::limits::MAX_MESSAGE_BYTES)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_under_the_limit_and_keep_rows_whole() {
        // Grok-1's vocabulary: 131072 floats = 512 KiB a row, two rows a chunk.
        assert_eq!(rows_per_chunk(131072), 2);
        // A row wider than a chunk still goes whole (and alone).
        assert_eq!(rows_per_chunk(1 << 20), 1);
        assert_eq!(rows_per_chunk(0), CHUNK_BYTES / 4);
        let v = vec![1f32; CHUNK_BYTES / 4 * 2 + 3];
        let sizes: Vec<usize> = float_chunks(&v).map(|c| c.len()).collect();
        assert_eq!(sizes, [CHUNK_BYTES / 4, CHUNK_BYTES / 4, 3]);
        assert_eq!(float_chunks(&[]).count(), 0);
    }
}
