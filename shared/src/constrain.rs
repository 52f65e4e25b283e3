//! Structured output: a grammar (a JSON schema, any JSON object, a regular expression, a Lark
//! grammar, a choice among strings) compiled by `llguidance` into the set of tokens that may
//! come next, one token at a time.
//!
//! The vocabulary is the tokenizer's: each token stands for the bytes it adds to the text
//! (SentencePiece pieces with `▁` as a space, byte pieces as their byte); control and unknown
//! pieces can never be part of the text, so they are special tokens of the trie (a leading
//! `0xff`, which no grammar matches). Ids past the tokenizer's vocabulary (a model with a
//! larger one) are never allowed.
//!
//! A text decoded on its own loses the leading space of its first piece (SentencePiece's
//! dummy prefix), so an output whose grammar allows a leading space may be shown without it.
//!
//! JSON output is compact by default (`", "` between items, `": "` after keys, no other
//! whitespace), so that a model cannot pad it without end; a schema's own `x-guidance`
//! object (llguidance's options) overrides that.

use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;
use toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenizerEnv};

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// A regular expression the whole output matches.
    Regex(String),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum ConstrainError {
    /// The grammar cannot be compiled (the caller's to fix).
    #[error("{0}")]
    Invalid(String),
    /// The vocabulary could not be built from the tokenizer.
    #[error("cannot build the grammar vocabulary: {0}")]
    Vocabulary(String),
    /// Generation cannot go on under the grammar (a parser limit, no token allowed).
    #[error("structured output cannot continue: {0}")]
    Failed(String),
}

/// The longest grammar text accepted (a schema, an expression, a grammar).
pub const MAX_GRAMMAR_BYTES: usize = 256 << 10;

/// The tokenizer as llguidance sees it: the trie of token bytes.
struct Vocab {
    trie: TokTrie,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The bytes each token adds to the text, for ids `0..vocab_size` of the model.
///
/// A piece is decoded after a fixed one: decoded alone, a piece's leading space would be
/// dropped as the start of a text.
pub fn token_bytes(tok: &Tokenizer, vocab_size: usize) -> Vec<Vec<u8>> {
    let anchor = tok
        .encode("a")
        .ok()
        .filter(|ids| ids.len() == 1)
        .map(|ids| (ids[0], tok.decode_bytes(&ids).unwrap_or_default()));
    let text = |id: u32| -> Vec<u8> {
        if let Some((a, base)) = &anchor {
            if let Ok(full) = tok.decode_bytes(&[*a, id]) {
                if let Some(rest) = full.strip_prefix(base.as_slice()) {
                    return rest.to_vec();
                }
            }
        }
        tok.decode_bytes(&[id]).unwrap_or_default()
    };
    (0..vocab_size)
        .map(|id| {
            let id = id as u32;
            if (id as usize) >= tok.vocab_size() {
                return Vec::new();
            }
            match tok.piece_kind(id) {
                crate::tokenizer::PieceKind::Text => text(id),
                // Never text: a special token (0xff + a name), which no grammar matches.
                crate::tokenizer::PieceKind::Special => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(format!("<special_{id}>").as_bytes());
                    w
                }
            }
        })
        .collect()
}

/// Compiles grammars over one vocabulary (built once: some hundred milliseconds for Grok-1's
/// 131,072 tokens).
pub struct Constrainer {
    factory: ParserFactory,
}

impl Constrainer {
    /// `vocab_size` is the model's (its logits' width); `eos` ends a finished output.
    pub fn new(tok: &Tokenizer, vocab_size: usize, eos: u32) -> Result<Self, ConstrainError> {
        let words = token_bytes(tok, vocab_size);
        if eos as usize >= vocab_size {
            return Err(ConstrainError::Vocabulary(format!(
                "end-of-sequence id {eos} is outside the vocabulary ({vocab_size})"
            )));
        }
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: toktrie::TokEnv = Arc::new(Vocab { trie });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstrainError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `g`; an error is the grammar's (a message for the caller).
    pub fn compile(&self, g: &Grammar) -> Result<Constraint, ConstrainError> {
        let parser = self
            .factory
            .create_parser(top_level(g)?)
            .map_err(|e| ConstrainError::Invalid(e.to_string()))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(ConstrainError::Invalid(e));
        }
        Ok(Constraint(m))
    }
}

/// llguidance's form of a grammar, with the compact JSON defaults.
fn top_level(g: &Grammar) -> Result<TopLevelGrammar, ConstrainError> {
    let text_len = match g {
        Grammar::JsonObject => 0,
        Grammar::JsonSchema(s) | Grammar::Regex(s) | Grammar::Lark(s) => s.len(),
        Grammar::Choice(v) => v.iter().map(String::len).sum(),
    };
    if text_len > MAX_GRAMMAR_BYTES {
        return Err(ConstrainError::Invalid(format!(
            "the grammar has {text_len} bytes; at most {MAX_GRAMMAR_BYTES} are accepted"
        )));
    }
    let compact = |mut schema: serde_json::Value| {
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert_with(|| {
                serde_json::json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                })
            });
        }
        TopLevelGrammar::from_json_schema(schema)
    };
    Ok(match g {
        Grammar::JsonObject => compact(serde_json::json!({"type": "object"})),
        Grammar::JsonSchema(s) => {
            let v: serde_json::Value = serde_json::from_str(s)
                .map_err(|e| ConstrainError::Invalid(format!("the schema is not JSON: {e}")))?;
            if !(v.is_object() || v.is_boolean()) {
                return Err(ConstrainError::Invalid(
                    "a JSON schema is an object (or true/false)".into(),
                ));
            }
            compact(v)
        }
        Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
        Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        Grammar::Choice(v) => {
            if v.is_empty() {
                return Err(ConstrainError::Invalid("the choice list is empty".into()));
            }
            if v.iter().any(String::is_empty) {
                return Err(ConstrainError::Invalid("a choice is empty".into()));
            }
            // Lark string literals are JSON strings.
            let alts: Vec<String> = v
                .iter()
                .map(|c| serde_json::to_string(c).expect("a string serializes"))
                .collect();
            TopLevelGrammar::from_lark(format!("start: {}\n", alts.join(" | ")))
        }
    })
}

/// llguidance's run-time error, without the parser state it appends.
fn failed(e: impl std::fmt::Display) -> ConstrainError {
    let e = e.to_string();
    let first = e.split("\n<state>").next().unwrap_or(&e).trim();
    ConstrainError::Failed(first.to_string())
}

/// One output's place in its grammar.
pub struct Constraint(Matcher);

impl Constraint {
    /// The tokens that may come next (the end-of-sequence token once the output is
    /// complete).
    pub fn allowed(&mut self) -> Result<TokenMask, ConstrainError> {
        // A finished grammar allows only the end of the sequence.
        let m = self.0.compute_mask_or_eos().map_err(failed)?;
        if m.is_zero() {
            return Err(ConstrainError::Failed(
                "no token of the vocabulary can continue the output".into(),
            ));
        }
        Ok(TokenMask(m))
    }

    /// Moves past `token` (one the mask allowed).
    pub fn advance(&mut self, token: u32) -> Result<(), ConstrainError> {
        self.0.consume_token(token).map_err(failed)
    }

    /// Whether the output so far is complete under the grammar.
    pub fn is_complete(&mut self) -> bool {
        self.0.is_accepting().unwrap_or(false)
    }
}

/// The set of tokens that may come next.
#[derive(Clone, Debug)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }

    /// Sets the logit of every token not allowed to -inf (keeps the allowed ones, then fills).
    pub fn apply(&self, logits: &mut [f32]) {
        let mut keep = Vec::new();
        self.0.iter_set_entries(|i| {
            if let Some(&v) = logits.get(i) {
                keep.push((i, v));
            }
        });
        logits.fill(f32::NEG_INFINITY);
        for (i, v) in keep {
            logits[i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;
    use std::path::PathBuf;

    fn grok_tokenizer() -> Tokenizer {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models/grok-1/tokenizer.model");
        Tokenizer::from_file(&p).expect("../shared/models/grok-1/tokenizer.model")
    }

    /// Samples under the grammar from random logits (a model with random weights): every
    /// token is one the mask allows; returns the text, or None when `max` tokens did not
    /// finish it.
    fn generate(
        c: &Constrainer,
        tok: &Tokenizer,
        g: &Grammar,
        seed: u64,
        max: usize,
    ) -> Option<String> {
        let eos = 2;
        let mut k = c.compile(g).unwrap();
        let mut rng = Rng::for_token(seed, 0);
        let mut ids = Vec::new();
        let v = 131072;
        let mut logits = vec![0f32; v];
        for _ in 0..max {
            for l in logits.iter_mut() {
                *l = (rng.next_f64() * 8.0) as f32;
            }
            let mask = k.allowed().unwrap();
            mask.apply(&mut logits);
            let (t, _) = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap();
            let t = t as u32;
            assert!(mask.allows(t));
            if t == eos {
                assert!(k.is_complete());
                return Some(tok.decode(&ids).unwrap());
            }
            k.advance(t).unwrap();
            ids.push(t);
        }
        None
    }

    #[test]
    fn token_bytes_concatenate_to_the_decoded_text() {
        let tok = grok_tokenizer();
        let words = token_bytes(&tok, tok.vocab_size());
        let text = "Hello, {\"name\": \"Ünïcødé 🚀\", \"n\": [1, 22, 333]}\n\tend  ";
        let ids = tok.encode(text).unwrap();
        let joined: Vec<u8> = ids
            .iter()
            .flat_map(|&i| words[i as usize].clone())
            .collect();
        // Encoding adds SentencePiece's leading space ("▁Hello"); decoding a text drops it.
        assert_eq!(joined, [b" ", text.as_bytes()].concat());
        assert_eq!(tok.decode_bytes(&ids).unwrap(), text.as_bytes());
        // Control pieces (pad, eos) are never text.
        assert_eq!(words[0][0], TokTrie::SPECIAL_TOKEN_MARKER);
        assert_eq!(words[2][0], TokTrie::SPECIAL_TOKEN_MARKER);
    }

    #[test]
    fn random_logits_under_a_schema_give_json_that_validates() {
        let tok = grok_tokenizer();
        let c = Constrainer::new(&tok, 131072, 2).unwrap();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "tag": {"enum": ["red", "green", "blue"]},
                "ok": {"type": "boolean"}
            },
            "required": ["name", "age", "tag", "ok"],
            "additionalProperties": false
        });
        let g = Grammar::JsonSchema(schema.to_string());
        for seed in 0..4 {
            let text = generate(&c, &tok, &g, seed, 200).expect("a bounded schema ends");
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
            let o = v.as_object().unwrap();
            assert_eq!(o.len(), 4, "{text}");
            assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
            let age = o["age"].as_i64().unwrap();
            assert!((0..=120).contains(&age), "{text}");
            assert!(["red", "green", "blue"].contains(&o["tag"].as_str().unwrap()));
            assert!(o["ok"].is_boolean());
        }
    }

    #[test]
    fn regex_choice_and_lark_hold_from_random_logits() {
        let tok = grok_tokenizer();
        let c = Constrainer::new(&tok, 131072, 2).unwrap();
        for seed in 0..3 {
            let t = generate(
                &c,
                &tok,
                &Grammar::Regex("[0-9]{3}-[a-z]{2,4}".into()),
                seed,
                40,
            )
            .unwrap();
            let b = t.as_bytes();
            assert!(t.len() >= 6 && t.len() <= 8, "{t:?}");
            assert!(
                b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'-',
                "{t:?}"
            );
            assert!(b[4..].iter().all(u8::is_ascii_lowercase), "{t:?}");
            let choices = vec!["yes".to_string(), "no \"way\"".to_string()];
            let t = generate(&c, &tok, &Grammar::Choice(choices.clone()), seed, 40).unwrap();
            assert!(choices.contains(&t), "{t:?}");
            let lark = "start: \"(\" NUM (\"+\" NUM)* \")\"\nNUM: /[1-9]/\n";
            let t = generate(&c, &tok, &Grammar::Lark(lark.into()), seed, 400);
            if let Some(t) = t {
                assert!(t.starts_with('(') && t.ends_with(')'), "{t:?}");
                let inner = &t[1..t.len() - 1];
                assert!(inner.split('+').all(|n| n.len() == 1 && n != "0"), "{t:?}");
            }
        }
    }

    #[test]
    fn bad_grammars_are_refused_with_the_reason() {
        let tok = grok_tokenizer();
        let c = Constrainer::new(&tok, 131072, 2).unwrap();
        let bad = [
            Grammar::JsonSchema("{not json".into()),
            Grammar::JsonSchema("[1]".into()),
            Grammar::JsonSchema(r#"{"type": "no-such-type"}"#.into()),
            Grammar::Regex("([a-z".into()),
            Grammar::Lark("start: undefined_rule\n".into()),
            Grammar::Choice(vec![]),
        ];
        for g in bad {
            match c.compile(&g) {
                Err(ConstrainError::Invalid(m)) => assert!(!m.is_empty()),
                Err(e) => panic!("{g:?}: {e}"),
                Ok(_) => panic!("{g:?} compiled"),
            }
        }
    }
}
