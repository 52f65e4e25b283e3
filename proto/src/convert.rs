//! Wire messages to the shared library's types and back.

use crate::v1 as pb;
use grok_shared::constrain::Grammar;

/// The grammar of a `constraint` (`json_object: false` and an empty one ask for none).
pub fn grammar_of(c: &pb::Constraint) -> Option<Grammar> {
    use pb::constraint::Kind;
    Some(match c.kind.as_ref()? {
        Kind::JsonSchema(s) => Grammar::JsonSchema(s.clone()),
        Kind::JsonObject(true) => Grammar::JsonObject,
        Kind::JsonObject(false) => return None,
        Kind::Regex(r) => Grammar::Regex(r.clone()),
        Kind::Lark(l) => Grammar::Lark(l.clone()),
        Kind::Choice(v) => Grammar::Choice(v.items.clone()),
    })
}

pub fn constraint_of(g: &Grammar) -> pb::Constraint {
    use pb::constraint::Kind;
    pb::Constraint {
        kind: Some(match g {
            Grammar::JsonObject => Kind::JsonObject(true),
            Grammar::JsonSchema(s) => Kind::JsonSchema(s.clone()),
            Grammar::Regex(r) => Kind::Regex(r.clone()),
            Grammar::Lark(l) => Kind::Lark(l.clone()),
            Grammar::Choice(v) => Kind::Choice(pb::Choices { items: v.clone() }),
        }),
    }
}

/// A placement of the experts on the wire.
pub fn placement_to_pb(p: &[Vec<usize>]) -> Vec<pb::ExpertRanks> {
    p.iter()
        .map(|r| pb::ExpertRanks {
            ranks: r.iter().map(|&x| x as u32).collect(),
        })
        .collect()
}

/// A placement of the experts from the wire.
pub fn placement_of(p: &[pb::ExpertRanks]) -> Vec<Vec<usize>> {
    p.iter()
        .map(|r| r.ranks.iter().map(|&x| x as usize).collect())
        .collect()
}

/// A layout on the wire.
pub fn layout_to_pb(l: &grok_shared::sharding::Layout) -> pb::Layout {
    pb::Layout {
        tp: l.tp as u32,
        ep: l.ep as u32,
        pp: l.pp as u32,
        replicas: l.replicas as u32,
        dp_attention: l.dp_attention,
        expert_copies: l.expert_copies as u32,
    }
}

/// A layout from the wire (replicas and expert copies of 0 read as 1).
pub fn layout_of(l: &pb::Layout) -> grok_shared::sharding::Layout {
    grok_shared::sharding::Layout {
        tp: l.tp as usize,
        ep: l.ep as usize,
        pp: l.pp as usize,
        replicas: l.replicas.max(1) as usize,
        dp_attention: l.dp_attention,
        expert_copies: l.expert_copies.max(1) as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammars_go_over_the_wire_and_back() {
        let all = [
            Grammar::JsonObject,
            Grammar::JsonSchema("{}".into()),
            Grammar::Regex("a+".into()),
            Grammar::Lark("start: \"x\"".into()),
            Grammar::Choice(vec!["a".into(), "b".into()]),
        ];
        for g in all {
            assert_eq!(grammar_of(&constraint_of(&g)), Some(g));
        }
        let none = pb::Constraint {
            kind: Some(pb::constraint::Kind::JsonObject(false)),
        };
        assert_eq!(grammar_of(&none), None);
        assert_eq!(grammar_of(&pb::Constraint::default()), None);
    }
}
