//! `session` (scorer): sticks a session (the value of the session-affinity header) to
//! the pod it was last routed to. The remembered pod scores 1, others 0; if it is gone
//! or filtered out, the other scorers decide and the session moves with `routed`.
//!
//! Memory is bounded: a session is forgotten `ttlMs` after its last request, or once
//! `maxSessions` newer affinity updates have been recorded, oldest first.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::RwLock;
use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, SchedulingRequest, Scorer,
};
use crate::pods::PodId;

pub const NAME: &str = "session";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    ttl_ms: u64,
    max_sessions: usize,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            ttl_ms: 600_000,
            max_sessions: 100_000,
        }
    }
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    if p.ttl_ms == 0 || p.max_sessions == 0 {
        return Err(PluginError::params(
            NAME,
            "ttlMs and maxSessions must be > 0",
        ));
    }
    Ok(Arc::new(Session {
        hasher: RandomState::new(),
        ttl: Duration::from_millis(p.ttl_ms),
        max_sessions: p.max_sessions,
        state: RwLock::new(State::default()),
    }))
}

pub struct Session {
    /// Sessions are keyed by a keyed hash of the header value, so memory does not grow
    /// with the length of client-chosen strings.
    hasher: RandomState,
    ttl: Duration,
    max_sessions: usize,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// Session hash → (pod, when the affinity ends).
    pods: HashMap<u64, (PodId, Duration)>,
    /// Updates oldest first; an entry whose deadline no longer matches `pods` is stale.
    order: VecDeque<(Duration, u64)>,
}

impl State {
    fn pop_oldest(&mut self) {
        if let Some((until, session)) = self.order.pop_front() {
            if self.pods.get(&session).is_some_and(|&(_, u)| u == until) {
                self.pods.remove(&session);
            }
        }
    }
}

impl Scorer for Session {
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &mut [Candidate], scores: &mut [f64]) {
        let Some(session) = req.session else {
            return;
        };
        let key = self.hasher.hash_one(session);
        let Some(&(pod, until)) = self.state.read().pods.get(&key) else {
            return;
        };
        if until <= req.now {
            return;
        }
        for (cand, score) in candidates.iter().zip(scores.iter_mut()) {
            if cand.pod.id == pod {
                *score = 1.0;
            }
        }
    }
}

impl Plugin for Session {
    fn name(&self) -> &'static str {
        NAME
    }

    fn routed(&self, req: &SchedulingRequest<'_>, chosen: &Candidate) {
        let Some(session) = req.session else {
            return;
        };
        let key = self.hasher.hash_one(session);
        let until = req.now + self.ttl;
        let mut state = self.state.write();
        while state.order.front().is_some_and(|&(u, _)| u <= req.now) {
            state.pop_oldest();
        }
        state.pods.insert(key, (chosen.pod.id, until));
        state.order.push_back((until, key));
        while state.order.len() > self.max_sessions {
            state.pop_oldest();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{candidates, context, params, request, scores};

    fn plugin(yaml: &str) -> Arc<dyn Scorer> {
        build(Some(&params(yaml)), &context()).unwrap()
    }

    fn with_session<'a>(blocks: &'a [u64], session: &'a str, now_ms: u64) -> SchedulingRequest<'a> {
        let mut req = request(blocks);
        req.session = Some(session);
        req.now = Duration::from_millis(now_ms);
        req
    }

    #[test]
    fn remembers_the_pod_until_the_ttl() {
        let session = plugin("{ttlMs: 1000}");
        let mut cands = candidates(3);
        session.routed(&with_session(&[1], "alice", 0), &cands[2]);
        let got = scores(
            session.as_ref(),
            &with_session(&[1], "alice", 999),
            &mut cands,
        );
        assert_eq!(got, vec![0.0, 0.0, 1.0]);
        let got = scores(session.as_ref(), &with_session(&[1], "bob", 10), &mut cands);
        assert_eq!(got, vec![0.0; 3]);
        let got = scores(session.as_ref(), &request(&[1]), &mut cands);
        assert_eq!(got, vec![0.0; 3]);
        let got = scores(
            session.as_ref(),
            &with_session(&[1], "alice", 1000),
            &mut cands,
        );
        assert_eq!(got, vec![0.0; 3]);
    }

    #[test]
    fn follows_the_session_when_it_moves() {
        let session = plugin("{}");
        let mut cands = candidates(2);
        session.routed(&with_session(&[1], "s", 0), &cands[0]);
        session.routed(&with_session(&[1], "s", 5), &cands[1]);
        let got = scores(session.as_ref(), &with_session(&[1], "s", 6), &mut cands);
        assert_eq!(got, vec![0.0, 1.0]);
    }

    #[test]
    fn bounded_oldest_first() {
        let session = plugin("{maxSessions: 2}");
        let mut cands = candidates(1);
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            session.routed(&with_session(&[1], name, i as u64), &cands[0]);
        }
        let score = |name: &str, cands: &mut [Candidate]| {
            scores(session.as_ref(), &with_session(&[1], name, 10), cands)[0]
        };
        assert_eq!(score("a", &mut cands), 0.0);
        assert_eq!(score("b", &mut cands), 1.0);
        assert_eq!(score("c", &mut cands), 1.0);
    }

    #[test]
    fn params_are_strict() {
        for bad in ["{ttlMs: 0}", "{maxSessions: 0}", "{header: x}"] {
            assert!(matches!(
                build(Some(&params(bad)), &context()),
                Err(PluginError::Params { .. })
            ));
        }
    }
}
