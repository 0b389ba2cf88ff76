//! Whether this node's kernel gate can be shown to work (LAN mode), as a pure rule.
//!
//! The gate is what silences a node whose speaker stops; a node that cannot install or
//! refresh it must not keep answering for VIPs. Someone else's firewall reload removes it
//! now and then, and the keeper puts it back within a heartbeat interval, so one failed
//! tick is not a verdict: only a gate that stayed unprovable for [`REPAIR_BOUND`] is. Then
//! the node gives up its VIPs (its holders unbind and release) and takes none until the gate
//! works again. A gate restored within the bound releases nothing, so a flush on every
//! node at once moves nothing.

use std::time::Duration;

use tokio::time::Instant;

/// How long the gate may stay unprovable before the node gives up its VIPs.
pub const REPAIR_BOUND: Duration = Duration::from_secs(1);

/// What changed, to be said once (a log line, an Event, the metric).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The gate has been unprovable for the bound: give up every VIP; the first error.
    Broken(String),
    /// It works again.
    Restored,
}

#[derive(Debug, Default, Clone)]
pub struct GateHealth {
    /// Since when, and the first error seen since then.
    failing: Option<(Instant, String)>,
    broken: bool,
}

impl GateHealth {
    /// Takes the outcome of one attempt to install or refresh the gate.
    pub fn observe(&mut self, outcome: Result<(), String>, now: Instant) -> Option<Change> {
        match outcome {
            Ok(()) => {
                self.failing = None;
                if self.broken {
                    self.broken = false;
                    return Some(Change::Restored);
                }
                None
            }
            Err(e) => {
                let (since, first) = self.failing.get_or_insert((now, e));
                if !self.broken && now >= *since + REPAIR_BOUND {
                    self.broken = true;
                    return Some(Change::Broken(first.clone()));
                }
                None
            }
        }
    }

    /// Why the node may not answer for VIPs now (None: it may).
    pub fn broken(&self) -> Option<&str> {
        self.failing
            .as_ref()
            .filter(|_| self.broken)
            .map(|(_, e)| e.as_str())
    }

    /// When the gate would be given up if nothing succeeds before (to be woken then).
    pub fn deadline(&self) -> Option<Instant> {
        match &self.failing {
            Some((since, _)) if !self.broken => Some(*since + REPAIR_BOUND),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_gate_put_back_within_the_bound_gives_up_nothing() {
        let t0 = Instant::now();
        let mut h = GateHealth::default();
        assert_eq!(h.observe(Err("gone".into()), t0), None);
        assert_eq!(h.deadline(), Some(t0 + REPAIR_BOUND));
        assert_eq!(h.observe(Err("still gone".into()), t0 + ms(100)), None);
        assert_eq!(h.observe(Ok(()), t0 + ms(200)), None);
        assert_eq!(h.broken(), None);
        assert_eq!(h.deadline(), None);
    }

    #[test]
    fn a_gate_unprovable_for_the_bound_is_given_up_once_and_restored_once() {
        let t0 = Instant::now();
        let mut h = GateHealth::default();
        h.observe(Err("first".into()), t0);
        assert_eq!(h.observe(Err("second".into()), t0 + ms(999)), None);
        assert_eq!(
            h.observe(Err("third".into()), t0 + REPAIR_BOUND),
            Some(Change::Broken("first".into())),
            "said once, with the first error"
        );
        assert_eq!(h.broken(), Some("first"));
        assert_eq!(h.observe(Err("again".into()), t0 + ms(1500)), None);
        assert_eq!(h.deadline(), None, "already given up");
        assert_eq!(h.observe(Ok(()), t0 + ms(1600)), Some(Change::Restored));
        assert_eq!(h.observe(Ok(()), t0 + ms(1700)), None);
        assert_eq!(h.broken(), None);
    }
}
