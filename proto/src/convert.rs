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
