//! The load progress bar of `grokctl up` and `grokctl launch`: one line redrawn in place on a
//! terminal, or a line per 10% step (and per state change) when stderr is a file or a pipe.

use grok_proto::v1 as pb;
use std::io::{IsTerminal, Write};

/// Overall fraction loaded: the mean over the shards (a ready shard counts as loaded).
pub fn fraction(st: &pb::ClusterStatusResponse) -> f64 {
    if st.shards.is_empty() {
        return 0.0;
    }
    st.shards
        .iter()
        .map(|s| match s.state.as_str() {
            "ready" => 1.0,
            "loading" => (s.load_fraction as f64).clamp(0.0, 1.0),
            _ => 0.0,
        })
        .sum::<f64>()
        / st.shards.len() as f64
}

/// One line: state, bar, percentage and each shard's own state.
pub fn render(st: &pb::ClusterStatusResponse, width: usize) -> String {
    let f = fraction(st);
    let filled = ((f * width as f64).round() as usize).min(width);
    let shards = st
        .shards
        .iter()
        .map(|s| match s.state.as_str() {
            "loading" => format!("r{} {:.0}%", s.rank, s.load_fraction * 100.0),
            other => format!("r{} {other}", s.rank),
        })
        .collect::<Vec<_>>()
        .join(" · ");
    format!(
        "{:<19} [{}{}] {:>3.0}%  {}",
        st.state,
        "#".repeat(filled),
        "-".repeat(width - filled),
        f * 100.0,
        shards
    )
}

/// Draws the progress of successive status answers.
pub struct LoadProgress {
    tty: bool,
    last_state: String,
    last_decile: i64,
    drawn: bool,
}

impl Default for LoadProgress {
    fn default() -> Self {
        LoadProgress {
            tty: std::io::stderr().is_terminal(),
            last_state: String::new(),
            last_decile: -1,
            drawn: false,
        }
    }
}

impl LoadProgress {
    pub fn show(&mut self, st: &pb::ClusterStatusResponse) {
        let line = render(st, 30);
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{line}");
            let _ = e.flush();
            self.drawn = true;
        } else {
            let decile = (fraction(st) * 10.0).floor() as i64;
            if st.state != self.last_state || decile != self.last_decile {
                let _ = writeln!(e, "{line}");
                self.last_state = st.state.clone();
                self.last_decile = decile;
            }
        }
    }

    /// Ends the redrawn line.
    pub fn finish(&mut self) {
        if self.tty && self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(rank: u32, state: &str, f: f32) -> pb::ShardStatus {
        pb::ShardStatus {
            rank,
            state: state.into(),
            load_fraction: f,
            ..Default::default()
        }
    }

    #[test]
    fn the_bar_is_the_mean_of_the_shards() {
        let st = pb::ClusterStatusResponse {
            state: "loading".into(),
            shards: vec![
                shard(0, "ready", 1.0),
                shard(1, "loading", 0.5),
                shard(2, "waiting", 0.0),
                shard(3, "loading", 0.5),
            ],
            ..Default::default()
        };
        assert!((fraction(&st) - 0.5).abs() < 1e-12);
        let l = render(&st, 10);
        assert!(l.contains("[#####-----]"), "{l}");
        assert!(l.contains(" 50%"), "{l}");
        assert!(l.contains("r0 ready · r1 50% · r2 waiting · r3 50%"), "{l}");
        let none = pb::ClusterStatusResponse::default();
        assert_eq!(fraction(&none), 0.0);
        assert!(render(&none, 4).contains("[----]"));
    }
}
