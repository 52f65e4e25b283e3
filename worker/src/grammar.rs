//! Structured output on the sampling rank: each constrained sequence's place in its grammar,
//! and the token masks of a step, computed on a thread of their own while the step's forward
//! pass runs (the step waits for them only before sampling).
//!
//! A grammar passes the tokens after the prompt in order of position: those generated before
//! the sequence was admitted here (sent with its sampling parameters: a preempted or moved
//! sequence) when it starts, then every step's tokens past the ones it has passed. A step run
//! again (a re-prefill) passes nothing twice.

use grok_proto::v1 as pb;
use grok_shared::constrain::{ConstrainError, Constrainer, Constraint, Grammar, TokenMask};
use grok_shared::sync::lock;
use grok_shared::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The vocabulary grammars are compiled over, built once in the background from the
/// coordinator's tokenizer.
#[derive(Clone)]
pub struct Grammars {
    built: Arc<OnceLock<Result<Constrainer, String>>>,
    source: Arc<(Vec<u8>, usize, u32)>,
}

impl Grammars {
    /// Starts building the vocabulary of `tokenizer` (a SentencePiece model file) for a model
    /// of `vocab` tokens.
    pub fn new(tokenizer: Vec<u8>, vocab: usize, eos: u32) -> Self {
        let g = Self {
            built: Arc::new(OnceLock::new()),
            source: Arc::new((tokenizer, vocab, eos)),
        };
        let bg = g.clone();
        std::thread::spawn(move || {
            if let Err(e) = bg.get() {
                tracing::warn!("structured output is unavailable: {e}");
            }
        });
        g
    }

    /// Whether this vocabulary was built from `tokenizer` (a reload with the same one keeps it).
    pub fn is_for(&self, tokenizer: &[u8]) -> bool {
        self.source.0 == tokenizer
    }

    fn get(&self) -> Result<&Constrainer, String> {
        self.built
            .get_or_init(|| {
                let (bytes, vocab, eos) = &*self.source;
                let t = Tokenizer::from_bytes(bytes).map_err(|e| e.to_string())?;
                Constrainer::new(&t, *vocab, *eos).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// One sequence's grammar: compiled on its first mask, then advanced token by token.
pub struct SeqGrammar(Arc<Mutex<State>>);

struct State {
    grammar: Grammar,
    matcher: Option<Constraint>,
    /// The position of the next token to pass.
    next: usize,
    /// Tokens passed when the grammar is compiled (generated before this admission).
    earlier: Vec<u32>,
    /// Once failed, always failed.
    failed: Option<String>,
}

impl SeqGrammar {
    /// `earlier` are the tokens generated before this admission, from `prompt_len` on;
    /// without a vocabulary (`has_vocab`: the coordinator sent no tokenizer) it fails at its
    /// first mask.
    pub fn new(grammar: Grammar, prompt_len: usize, earlier: Vec<u32>, has_vocab: bool) -> Self {
        Self(Arc::new(Mutex::new(State {
            grammar,
            matcher: None,
            next: prompt_len + earlier.len(),
            earlier,
            failed: (!has_vocab)
                .then(|| "structured output: this worker was given no tokenizer".to_string()),
        })))
    }
}

impl State {
    fn run(
        &mut self,
        g: &Grammars,
        start: usize,
        tokens: &[u32],
        mask: bool,
    ) -> Option<Result<TokenMask, String>> {
        if self.failed.is_none() {
            if let Err(e) = self.advance(g, start, tokens) {
                self.failed = Some(e);
            }
        }
        if let Some(e) = &self.failed {
            return mask.then(|| Err(e.clone()));
        }
        if !mask {
            return None;
        }
        let m = self
            .matcher
            .as_mut()
            .expect("compiled by advance")
            .allowed();
        Some(m.map_err(|e| {
            let e = e.to_string();
            self.failed = Some(e.clone());
            e
        }))
    }

    fn advance(&mut self, g: &Grammars, start: usize, tokens: &[u32]) -> Result<(), String> {
        if self.matcher.is_none() {
            let c = g
                .get()
                .map_err(|e| format!("structured output is unavailable: {e}"))?;
            let mut m = c.compile(&self.grammar).map_err(|e| match e {
                ConstrainError::Invalid(m) => format!("the grammar does not compile: {m}"),
                e => e.to_string(),
            })?;
            for &t in &self.earlier {
                m.advance(t).map_err(|e| e.to_string())?;
            }
            self.earlier = Vec::new();
            self.matcher = Some(m);
        }
        let m = self.matcher.as_mut().expect("compiled above");
        let end = start + tokens.len();
        if end <= self.next {
            return Ok(());
        }
        if start > self.next {
            return Err(format!(
                "the step starts at position {start}, past the grammar's {}",
                self.next
            ));
        }
        for &t in &tokens[self.next - start..] {
            m.advance(t).map_err(|e| e.to_string())?;
        }
        self.next = end;
        Ok(())
    }
}

/// One sequence's part of a step for its grammar.
pub struct Work {
    seq_id: u64,
    grammar: Arc<Mutex<State>>,
    start: usize,
    tokens: Vec<u32>,
    /// The step samples it: its mask is needed.
    mask: bool,
}

impl Work {
    pub fn of(seq_id: u64, g: &SeqGrammar, s: &pb::SeqStep) -> Self {
        Self {
            seq_id,
            grammar: g.0.clone(),
            start: s.start_pos as usize,
            tokens: s.tokens.clone(),
            mask: s.sample,
        }
    }
}

/// A step's masks, being computed.
pub struct Pending(std::thread::JoinHandle<HashMap<u64, Result<TokenMask, String>>>);

/// Passes every sequence's new tokens and computes the masks of those the step samples, on a
/// thread of its own.
pub fn start(g: Option<&Grammars>, work: Vec<Work>) -> Pending {
    let g = g.cloned();
    Pending(std::thread::spawn(move || {
        work.into_iter()
            .filter_map(|w| {
                let mut st = lock(&w.grammar);
                let r = match &g {
                    Some(g) => st.run(g, w.start, &w.tokens, w.mask),
                    None => w
                        .mask
                        .then(|| Err(st.failed.clone().unwrap_or_else(|| "no vocabulary".into()))),
                };
                r.map(|r| (w.seq_id, r))
            })
            .collect()
    }))
}

impl Pending {
    /// The masks by sequence (an error: the sequence cannot go on).
    pub fn finish(self) -> HashMap<u64, Result<TokenMask, String>> {
        self.0.join().unwrap_or_else(|_| HashMap::new())
    }
}
