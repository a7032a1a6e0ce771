//! Which pods to profile: namespaces and a label selector in kubectl's syntax
//! (`app=web`, `tier!=test`, `env in (prod,staging)`, `track notin (canary)`, `team`, `!legacy`,
//! comma-separated, all required).

use std::{
    collections::{BTreeMap, BTreeSet},
    str::FromStr,
};

use anyhow::{bail, ensure};

use super::watcher::PodMetadata;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Equals(String),
    NotEquals(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Op::Equals(v) => value == Some(v),
            // As in Kubernetes: an absent label is "not equal" and "not in".
            Op::NotEquals(v) => value != Some(v),
            Op::In(set) => value.is_some_and(|v| set.contains(v)),
            Op::NotIn(set) => !value.is_some_and(|v| set.contains(v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

fn check_key(key: &str) -> anyhow::Result<String> {
    ensure!(
        !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')),
        "invalid label key {key:?}"
    );
    Ok(key.to_owned())
}

fn check_value(value: &str) -> anyhow::Result<String> {
    ensure!(
        value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
        "invalid label value {value:?}"
    );
    Ok(value.to_owned())
}

/// Splits on commas outside parentheses.
fn terms(s: &str) -> anyhow::Result<Vec<&str>> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        ensure!((0..=1).contains(&depth), "unbalanced parentheses in {s:?}");
    }
    ensure!(depth == 0, "unbalanced parentheses in {s:?}");
    out.push(&s[start..]);
    Ok(out)
}

fn parse_term(term: &str) -> anyhow::Result<Requirement> {
    let term = term.trim();
    ensure!(!term.is_empty(), "empty requirement");
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement {
            key: check_key(key.trim())?,
            op: Op::DoesNotExist,
        });
    }
    if let Some(open) = term.find('(') {
        ensure!(term.ends_with(')'), "{term:?}: expected `key in (a,b)`");
        let head: Vec<&str> = term[..open].split_whitespace().collect();
        let values = term[open + 1..term.len() - 1]
            .split(',')
            .map(|v| check_value(v.trim()))
            .collect::<anyhow::Result<BTreeSet<_>>>()?;
        let op = match head.as_slice() {
            [_, "in"] => Op::In(values),
            [_, "notin"] => Op::NotIn(values),
            _ => bail!("{term:?}: expected `key in (…)` or `key notin (…)`"),
        };
        return Ok(Requirement {
            key: check_key(head[0])?,
            op,
        });
    }
    for (sep, not) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = term.split_once(sep) {
            let value = check_value(value.trim())?;
            return Ok(Requirement {
                key: check_key(key.trim())?,
                op: if not {
                    Op::NotEquals(value)
                } else {
                    Op::Equals(value)
                },
            });
        }
    }
    Ok(Requirement {
        key: check_key(term)?,
        op: Op::Exists,
    })
}

impl FromStr for LabelSelector {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let requirements = terms(s)?
            .into_iter()
            .map(parse_term)
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { requirements })
    }
}

/// The pods to profile: in one of `namespaces` (any when empty) and matching `labels`.
#[derive(Debug, Clone, Default)]
pub struct WorkloadSelector {
    pub namespaces: BTreeSet<String>,
    pub labels: LabelSelector,
}

impl WorkloadSelector {
    pub fn matches(&self, pod: &PodMetadata) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&pod.namespace))
            && self.labels.matches(&pod.labels)
    }

    /// Selects everything: no filter needed.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.labels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_and_set_requirements() {
        let s: LabelSelector =
            "app.kubernetes.io/name in (checkout, cart),tier!=test,team, !legacy"
                .parse()
                .unwrap();
        assert!(s.matches(&labels(&[
            ("app.kubernetes.io/name", "cart"),
            ("team", "shop")
        ])));
        assert!(!s.matches(&labels(&[
            ("app.kubernetes.io/name", "cart"),
            ("team", "shop"),
            ("tier", "test")
        ])));
        assert!(
            !s.matches(&labels(&[("app.kubernetes.io/name", "cart")])),
            "team required"
        );
        assert!(!s.matches(&labels(&[
            ("app.kubernetes.io/name", "cart"),
            ("team", "x"),
            ("legacy", "")
        ])));
        assert!(!s.matches(&labels(&[("app.kubernetes.io/name", "web"), ("team", "x")])));

        let s: LabelSelector = "env==prod,track notin (canary)".parse().unwrap();
        assert!(s.matches(&labels(&[("env", "prod")])), "absent is notin");
        assert!(!s.matches(&labels(&[("env", "prod"), ("track", "canary")])));
        assert!(!s.matches(&labels(&[("env", "staging")])));
    }

    #[test]
    fn empty_selects_everything_and_bad_input_is_rejected() {
        let s: LabelSelector = "  ".parse().unwrap();
        assert!(s.is_empty() && s.matches(&labels(&[])));
        for bad in [
            "a in (b",
            "a in b)",
            "a,,b",
            "a b=c",
            "a=b c",
            "x in (a b)",
            "a foo (b)",
        ] {
            assert!(bad.parse::<LabelSelector>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn workload_selector_checks_namespaces() {
        let pod = PodMetadata {
            uid: "u".into(),
            name: "p".into(),
            namespace: "shop".into(),
            labels: labels(&[("app", "web")]),
            workload: None,
            containers: vec![],
        };
        let mut s = WorkloadSelector::default();
        assert!(s.is_empty() && s.matches(&pod));
        s.namespaces.insert("payments".into());
        assert!(!s.matches(&pod));
        s.namespaces.insert("shop".into());
        assert!(s.matches(&pod));
        s.labels = "app=api".parse().unwrap();
        assert!(!s.matches(&pod));
    }
}
