//! Grok-1's SentencePiece tokenizer (`tokenizer.model`, BPE with byte fallback), read and run in
//! pure Rust. Encoding matches the reference `sentencepiece` library: no BOS is added (the
//! official runner adds none), user-defined pieces (`<|separator|>`, digit and whitespace runs)
//! are matched, and the text `[UNK]` etc. is treated as ordinary text.

use kitoken::{Kitoken, SpecialTokenKind};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {why}")]
    Load { path: PathBuf, why: String },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode ids: {0}")]
    Decode(String),
    #[error("token id {id} is outside the tokenizer's vocabulary ({vocab})")]
    OutOfVocab { id: u32, vocab: usize },
}

/// What a token id stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceKind {
    /// Text (a piece or a byte).
    Text,
    /// A control or unknown piece: never part of a text.
    Special,
}

pub struct Tokenizer {
    inner: Kitoken,
    vocab_size: usize,
    /// Control and unknown pieces, which decode to nothing (control) or U+2047 (unknown), as
    /// sentencepiece does.
    hidden: std::collections::HashMap<u32, &'static str>,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let data = std::fs::read(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        Self::from_bytes(&data).map_err(|e| match e {
            TokenizerError::Load { why, .. } => TokenizerError::Load {
                path: path.to_path_buf(),
                why,
            },
            other => other,
        })
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self, TokenizerError> {
        let load = |why: String| TokenizerError::Load {
            path: PathBuf::new(),
            why,
        };
        let def = kitoken::Definition::from_sentencepiece_slice(data)
            .map_err(|e| load(format!("{e:?}")))?;
        let max_id = def
            .model
            .vocab()
            .iter()
            .map(|t| t.id)
            .chain(def.specials.iter().map(|t| t.id))
            .max()
            .unwrap_or(0);
        let vocab_size = max_id as usize + 1;
        let hidden = def
            .specials
            .iter()
            .filter_map(|t| match t.kind {
                SpecialTokenKind::Control => Some((t.id, "")),
                SpecialTokenKind::Unknown => Some((t.id, " \u{2047} ")),
                SpecialTokenKind::Priority => None,
            })
            .collect();
        let inner = Kitoken::from_definition(def).map_err(|e| load(format!("{e:?}")))?;
        Ok(Self {
            inner,
            vocab_size,
            hidden,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether token `id` stands for text, or is a control or unknown piece.
    pub fn piece_kind(&self, id: u32) -> PieceKind {
        if self.hidden.contains_key(&id) {
            PieceKind::Special
        } else {
            PieceKind::Text
        }
    }

    /// Only user-defined ("priority") pieces are matched as specials; control and unknown
    /// pieces are never produced from text, as in sentencepiece.
    const SPECIALS: &'static [SpecialTokenKind] = &[SpecialTokenKind::Priority];

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, Self::SPECIALS)
            .map_err(|e| TokenizerError::Encode(format!("{e:?}")))
    }

    /// Decodes ids to bytes (a prefix of a stream may end inside a UTF-8 character).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(TokenizerError::OutOfVocab {
                id,
                vocab: self.vocab_size,
            });
        }
        // Control pieces decode to nothing: drop them first so that the pieces around them
        // join as if they were adjacent (a piece's leading space is kept).
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| self.hidden.get(id) != Some(&""))
            .collect();
        let mut out = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        for &id in &kept {
            if let Some(text) = self.hidden.get(&id) {
                self.decode_run(&run, &mut out)?;
                run.clear();
                out.extend_from_slice(text.as_bytes());
            } else {
                run.push(id);
            }
        }
        self.decode_run(&run, &mut out)?;
        Ok(out)
    }

    fn decode_run(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), TokenizerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let b = self
            .inner
            .decode(ids, Self::SPECIALS)
            .map_err(|e| TokenizerError::Decode(format!("{e:?}")))?;
        out.extend_from_slice(&b);
        Ok(())
    }

    /// Decodes ids to text, replacing invalid UTF-8 with U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}

/// Turns a growing list of ids into text deltas that never split a UTF-8 character.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let bytes = tok.decode_bytes(&self.ids)?;
        let valid = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => bytes.len(),
        };
        if valid < self.emitted {
            return Ok(String::new());
        }
        let delta = String::from_utf8_lossy(&bytes[self.emitted..valid]).into_owned();
        self.emitted = valid;
        Ok(delta)
    }
}
