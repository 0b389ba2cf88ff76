//! Who is alive on the LAN, and who hears us: pure bookkeeping of heartbeats sent and
//! received, with the clock passed in.
//!
//! - A peer is alive while its newest authentic frame arrived less than `dead_after` ago (our
//!   monotonic clock).
//! - A peer hears us if its newest frame acks one of ours; the ack is as fresh as the frame it
//!   names, which we timed when we sent it. So stale acks (read from a socket buffer after a
//!   freeze, say) cannot make us look heard now.
//! - A peer silent for `dead_after` is *declared dead* at the generation it had: from then on
//!   its frames of that generation are ignored (no ack, not alive) until it comes back with a
//!   higher one, which it can only get through the API. Our frames list our declarations, so
//!   others can count them (see [`crate::ownership::quorum`]).
//! - A frame is refused as a replay when its seq is not above the newest seq from that peer
//!   on that interface, or when the wall-clock time in its seq is more than [`MAX_SKEW`] away
//!   from ours (a frame recorded earlier and played to a speaker that just started).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::wire::{Heartbeat, NodeId, node_id};

/// Node clocks may differ by this much before their heartbeats are refused.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// A peer silent this long is forgotten (its replay state too).
pub const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Our own frames remembered, to time the acks that name them.
const SENT_KEPT: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: NodeId,
    pub generation: u32,
    /// Whom it has declared dead, at which generation (its newest frame).
    pub dead: Vec<(NodeId, u32)>,
    /// When its newest frame arrived.
    pub heard_at: Instant,
    pub seq: u64,
    pub interval: Duration,
    /// When we sent the newest of our frames that it acked.
    pub acked_us: Option<Instant>,
    /// Whom it hears: its newest frame's acks.
    pub hears: Vec<NodeId>,
    newest_on: HashMap<u32, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Accepted,
    /// An old frame again, or one from far outside our clock.
    Replayed,
    /// Our own frame, looped back by the LAN.
    Own,
    /// From a generation we declared dead: ignored.
    Dead,
}

#[derive(Debug)]
pub struct Peers {
    me: String,
    my_id: NodeId,
    dead_after: Duration,
    seq: u64,
    generation: u32,
    sent: VecDeque<(u64, Instant)>,
    peers: BTreeMap<String, Peer>,
    /// Our declarations: peer → the generation we declared dead.
    declared: BTreeMap<String, u32>,
    /// When any authentic frame of each peer arrived last (also of a generation we ignore).
    last_any: BTreeMap<String, Instant>,
    /// A peer appeared or changed its declarations since [`Peers::take_news`] was last asked.
    news: bool,
    /// Each member's generation as its node Lease shows it, and since when we have seen it.
    lease_generation: BTreeMap<String, (u32, Instant)>,
}

impl Peers {
    pub fn new(me: &str, dead_after: Duration) -> Self {
        Peers {
            me: me.to_string(),
            my_id: node_id(me),
            dead_after,
            seq: 0,
            generation: 0,
            sent: VecDeque::new(),
            peers: BTreeMap::new(),
            declared: BTreeMap::new(),
            last_any: BTreeMap::new(),
            news: false,
            lease_generation: BTreeMap::new(),
        }
    }

    /// Whether a peer appeared or changed whom it declares dead since the last call: what
    /// the take-over evidence is made of, worth acting on before the next tick.
    pub fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }

    /// When the next alive peer falls silent for `dead_after` if nothing more arrives from
    /// it: the moment to declare it, rather than at the next tick.
    pub fn next_silence(&self, now: Instant) -> Option<Instant> {
        self.peers
            .values()
            .map(|p| p.heard_at + self.dead_after)
            .filter(|t| *t > now)
            .min()
    }

    /// Whether no authentic frame at all came from `node` for `dead_after` (a node still
    /// sending frames of a generation we declared dead is not silent: it is moving on to a
    /// new one, which must not be declared dead before it is heard).
    pub fn silent(&self, node: &str, now: Instant) -> bool {
        self.last_any
            .get(node)
            .is_none_or(|t| now.saturating_duration_since(*t) >= self.dead_after)
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// We are in generation `g` now: acks of frames of earlier generations count no more.
    pub fn set_generation(&mut self, g: u32) {
        if g != self.generation {
            self.generation = g;
            self.sent.clear();
            for p in self.peers.values_mut() {
                p.acked_us = None;
            }
        }
    }

    /// Declares every peer silent for `dead_after` dead at its generation.
    pub fn declare_silent(&mut self, now: Instant) {
        for (name, p) in &self.peers {
            if now.saturating_duration_since(p.heard_at) >= self.dead_after
                && self.declared.get(name).is_none_or(|g| *g < p.generation)
            {
                self.declared.insert(name.clone(), p.generation);
            }
        }
    }

    /// Declares every silent peer dead (see [`Peers::declare_silent`]) and every silent
    /// `member` (name, the generation its node Lease shows) dead in that generation too; a
    /// member never heard only once we have `listened` for dead_after, and a member in a
    /// generation only once its Lease has shown it for dead_after. A node that comes back
    /// writes its new generation before its first frames of it reach us: declared at once,
    /// those frames would be ignored, so it would never hear that we count it dead in that
    /// generation too, nor we the declarations it made while it was away.
    pub fn declare_silent_members(
        &mut self,
        members: &[(&str, u32)],
        listened: bool,
        now: Instant,
    ) {
        self.declare_silent(now);
        self.lease_generation
            .retain(|n, _| members.iter().any(|(m, _)| m == n));
        for (m, generation) in members {
            let (g, since) = self
                .lease_generation
                .entry(m.to_string())
                .or_insert((*generation, now));
            if *g != *generation {
                (*g, *since) = (*generation, now);
            }
            let shown_long_enough = now.saturating_duration_since(*since) >= self.dead_after;
            if *m != self.me
                && (self.knows(m) || listened)
                && self.silent(m, now)
                && shown_long_enough
            {
                self.declare(m, *generation);
            }
        }
    }

    /// Declares `node` dead at `generation` (a member never heard, its generation read from
    /// the API); a later declaration of a lower generation changes nothing.
    pub fn declare(&mut self, node: &str, generation: u32) {
        let d = self.declared.entry(node.to_string()).or_insert(generation);
        *d = (*d).max(generation);
    }

    /// The generation at which we declared `node` dead, if we did.
    pub fn declared(&self, node: &str) -> Option<u32> {
        self.declared.get(node).copied()
    }

    /// Our declarations, for our frames.
    pub fn dead_list(&self) -> Vec<(NodeId, u32)> {
        self.declared
            .iter()
            .map(|(n, g)| (node_id(n), *g))
            .collect()
    }

    /// Whether `by` (alive) says in its newest frame that it declared `node` dead at
    /// `generation` or later.
    pub fn reports_dead(&self, by: &str, node: &str, generation: u32, now: Instant) -> bool {
        let id = node_id(node);
        self.is_alive(by, now)
            && self.peers[by]
                .dead
                .iter()
                .any(|(d, g)| *d == id && *g >= generation)
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn dead_after(&self) -> Duration {
        self.dead_after
    }

    /// The seq of the frame about to be sent at `now`: above every earlier one, and at least
    /// `wall_micros` (microseconds since the Unix epoch), so a restarted speaker goes on above
    /// its previous life and receivers can check the frame's age.
    pub fn next_seq(&mut self, now: Instant, wall_micros: u64) -> u64 {
        self.seq = (self.seq + 1).max(wall_micros);
        if self.sent.len() == SENT_KEPT {
            self.sent.pop_front();
        }
        self.sent.push_back((self.seq, now));
        self.seq
    }

    /// The acks for our next frame: every peer heard within `dead_after`, most recently
    /// heard first.
    pub fn acks(&self, now: Instant) -> Vec<(NodeId, u64)> {
        let mut v: Vec<&Peer> = self
            .peers
            .values()
            .filter(|p| now.saturating_duration_since(p.heard_at) < self.dead_after)
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.heard_at));
        v.into_iter().map(|p| (p.id, p.seq)).collect()
    }

    /// Takes in an authentic frame that arrived on interface `ifindex` at `now`.
    pub fn receive(
        &mut self,
        ifindex: u32,
        hb: &Heartbeat,
        now: Instant,
        wall_micros: u64,
    ) -> Received {
        if hb.node == self.me {
            return Received::Own;
        }
        if hb.seq.abs_diff(wall_micros) > MAX_SKEW.as_micros() as u64 {
            return Received::Replayed;
        }
        match self.declared.get(&hb.node) {
            Some(g) if hb.generation <= *g => {
                self.last_any.insert(hb.node.clone(), now);
                return Received::Dead;
            }
            Some(_) => {
                self.declared.remove(&hb.node);
            }
            None => {}
        }
        let acked_us = hb
            .acks
            .iter()
            .find(|(id, _)| *id == self.my_id)
            .and_then(|(_, seq)| self.sent_at(*seq));
        if !self.peers.contains_key(&hb.node) {
            self.news = true;
        }
        let peer = self.peers.entry(hb.node.clone()).or_insert_with(|| Peer {
            id: node_id(&hb.node),
            generation: hb.generation,
            dead: Vec::new(),
            heard_at: now,
            seq: 0,
            interval: Duration::ZERO,
            acked_us: None,
            hears: Vec::new(),
            newest_on: HashMap::new(),
        });
        let newest = peer.newest_on.entry(ifindex).or_insert(0);
        if hb.seq <= *newest {
            return Received::Replayed;
        }
        *newest = hb.seq;
        self.last_any.insert(hb.node.clone(), now);
        if hb.seq > peer.seq {
            peer.seq = hb.seq;
            peer.heard_at = now;
            peer.interval = Duration::from_millis(u64::from(hb.interval_ms));
            peer.hears = hb.acks.iter().map(|(id, _)| *id).collect();
            if peer.dead != hb.dead {
                peer.dead = hb.dead.clone();
                self.news = true;
            }
            if hb.generation != peer.generation {
                peer.generation = hb.generation;
            }
            // An ack of an older frame than one already counted does not make us less heard.
            peer.acked_us = match (peer.acked_us, acked_us) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => b.or(a),
            };
        }
        Received::Accepted
    }

    fn sent_at(&self, seq: u64) -> Option<Instant> {
        let i = self.sent.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        Some(self.sent[i].1)
    }

    pub fn is_alive(&self, node: &str, now: Instant) -> bool {
        self.peers
            .get(node)
            .is_some_and(|p| now.saturating_duration_since(p.heard_at) < self.dead_after)
    }

    /// Peers heard within `dead_after`.
    pub fn alive(&self, now: Instant) -> Vec<&str> {
        self.peers
            .iter()
            .filter(|(n, _)| self.is_alive(n, now))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Alive peers that acked a frame of ours sent within `fresh` before `now`.
    pub fn hearing_us(&self, now: Instant, fresh: Duration) -> Vec<&str> {
        self.peers
            .iter()
            .filter(|(n, p)| {
                self.is_alive(n, now)
                    && p.acked_us
                        .is_some_and(|t| now.saturating_duration_since(t) < fresh)
            })
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Alive peers whose newest frame says they hear `node`.
    pub fn reporting(&self, node: &str, now: Instant) -> Vec<&str> {
        let id = node_id(node);
        self.peers
            .iter()
            .filter(|(n, p)| n.as_str() != node && self.is_alive(n, now) && p.hears.contains(&id))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// How many of `members` (us included, `node` not counted) have declared `node` dead at
    /// `generation` or later: we by our own declaration, the others by their newest frame.
    pub fn declarers(&self, node: &str, generation: u32, members: &[&str], now: Instant) -> usize {
        members
            .iter()
            .filter(|m| **m != node)
            .filter(|m| {
                if **m == self.me {
                    self.declared(node).is_some_and(|g| g >= generation)
                } else {
                    self.reports_dead(m, node, generation, now)
                }
            })
            .count()
    }

    /// Whether we know `node` at all (heard it, or declared it).
    pub fn knows(&self, node: &str) -> bool {
        self.peers.contains_key(node) || self.declared.contains_key(node)
    }

    /// For each alive peer among `members`, when we sent the newest of our frames it acked.
    pub fn acked_times(&self, members: &[&str], now: Instant) -> Vec<Instant> {
        members
            .iter()
            .filter(|m| **m != self.me && self.is_alive(m, now))
            .filter_map(|m| self.peers[*m].acked_us)
            .collect()
    }

    /// Whether an alive peer declared us dead in our current generation.
    pub fn declared_us(&self, now: Instant) -> bool {
        let g = self.generation;
        self.peers
            .keys()
            .any(|p| self.reports_dead(p, &self.me, g, now))
    }

    pub fn get(&self, node: &str) -> Option<&Peer> {
        self.peers.get(node)
    }

    /// Drops peers silent for [`FORGET_AFTER`].
    pub fn forget_silent(&mut self, now: Instant) {
        self.peers
            .retain(|_, p| now.saturating_duration_since(p.heard_at) < FORGET_AFTER);
        self.last_any
            .retain(|_, t| now.saturating_duration_since(*t) < FORGET_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALL: u64 = 1_764_000_000_000_000;

    fn hb(node: &str, seq: u64, acks: &[(&str, u64)]) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            seq,
            generation: 0,
            interval_ms: 100,
            acks: acks.iter().map(|(n, s)| (node_id(n), *s)).collect(),
            dead: vec![],
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_peer_is_alive_until_it_has_been_silent_for_dead_after() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        assert_eq!(
            p.receive(1, &hb("b", WALL, &[]), t0, WALL),
            Received::Accepted
        );
        assert_eq!(p.alive(t0 + ms(399)), vec!["b"]);
        assert!(p.alive(t0 + ms(400)).is_empty());
        assert_eq!(p.acks(t0 + ms(10)), vec![(node_id("b"), WALL)]);
        assert!(p.acks(t0 + ms(400)).is_empty());
    }

    #[test]
    fn a_new_peer_or_a_new_declaration_is_news_and_silence_has_a_deadline() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        assert!(!p.take_news());
        assert_eq!(p.next_silence(t0), None);
        p.receive(1, &hb("b", WALL, &[]), t0, WALL);
        assert!(p.take_news(), "a new peer");
        assert!(!p.take_news(), "asked once");
        p.receive(1, &hb("b", WALL + 1, &[]), t0 + ms(100), WALL);
        assert!(!p.take_news(), "the same declarations again");
        assert_eq!(p.next_silence(t0 + ms(100)), Some(t0 + ms(500)));
        let mut f = hb("b", WALL + 2, &[]);
        f.dead = vec![(node_id("c"), 3)];
        p.receive(1, &f, t0 + ms(200), WALL);
        assert!(p.take_news(), "b declared c dead");
        assert_eq!(p.next_silence(t0 + ms(600)), None, "b is silent already");
    }

    #[test]
    fn an_ack_is_as_fresh_as_the_frame_it_names() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        let s1 = p.next_seq(t0, WALL);
        let s2 = p.next_seq(t0 + ms(100), WALL);
        assert_eq!(s2, s1 + 1);
        // b's frame, read late (after a freeze, say), acks our first frame.
        p.receive(1, &hb("b", WALL + 5, &[("a", s1)]), t0 + ms(900), WALL);
        assert_eq!(p.get("b").unwrap().acked_us, Some(t0));
        assert!(p.hearing_us(t0 + ms(900), ms(300)).is_empty());
        assert_eq!(p.hearing_us(t0 + ms(250), ms(300)), vec!["b"]);
        // A newer ack counts; an older one after it does not move it back.
        p.receive(1, &hb("b", WALL + 6, &[("a", s2)]), t0 + ms(910), WALL);
        p.receive(1, &hb("b", WALL + 7, &[("a", s1)]), t0 + ms(920), WALL);
        assert_eq!(p.get("b").unwrap().acked_us, Some(t0 + ms(100)));
        // An ack of a frame we never sent (a previous life's, or made up) counts for nothing.
        let mut q = Peers::new("a", ms(400));
        q.receive(1, &hb("b", WALL, &[("a", 42)]), t0, WALL);
        assert_eq!(q.get("b").unwrap().acked_us, None);
    }

    #[test]
    fn replayed_frames_and_frames_far_from_our_clock_are_refused() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        assert_eq!(
            p.receive(1, &hb("b", WALL + 10, &[]), t0, WALL),
            Received::Accepted
        );
        assert_eq!(
            p.receive(1, &hb("b", WALL + 10, &[]), t0 + ms(500), WALL),
            Received::Replayed
        );
        assert_eq!(
            p.receive(1, &hb("b", WALL + 9, &[]), t0 + ms(500), WALL),
            Received::Replayed
        );
        assert!(
            !p.is_alive("b", t0 + ms(500)),
            "a replay does not keep b alive"
        );
        // The same frame on a second interface to the same LAN is no replay.
        assert_eq!(
            p.receive(2, &hb("b", WALL + 10, &[]), t0, WALL),
            Received::Accepted
        );
        let old = WALL - MAX_SKEW.as_micros() as u64 - 1;
        assert_eq!(
            p.receive(1, &hb("c", old, &[]), t0, WALL),
            Received::Replayed
        );
        assert_eq!(p.receive(1, &hb("a", WALL, &[]), t0, WALL), Received::Own);
    }

    #[test]
    fn a_restarted_speaker_goes_on_above_its_previous_frames() {
        let t0 = Instant::now();
        let mut before = Peers::new("b", ms(400));
        for i in 0..1000 {
            before.next_seq(t0, WALL + i);
        }
        let last = before.next_seq(t0, WALL + 1000);
        let mut after = Peers::new("b", ms(400));
        assert!(after.next_seq(t0, WALL + 2000) > last);
    }

    /// The lab's case: b was away and declared dead in generation 0; it comes back, writes
    /// generation 1 to its Lease, and its first frame of generation 1 arrives 80 ms later.
    /// Declared in generation 1 at once, that frame would be ignored and neither side would
    /// ever move on.
    #[test]
    fn a_member_in_a_new_generation_is_declared_only_once_silent_in_it_for_dead_after() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        p.receive(1, &hb("b", WALL + 1, &[]), t0, WALL);
        p.declare_silent_members(&[("a", 0), ("b", 0)], true, t0 + ms(400));
        assert_eq!(p.declared("b"), Some(0));
        // Its Lease shows generation 1 while it is still silent: not declared in it yet.
        let back = t0 + ms(1000);
        p.declare_silent_members(&[("a", 0), ("b", 1)], true, back);
        p.declare_silent_members(&[("a", 0), ("b", 1)], true, back + ms(50));
        assert_eq!(p.declared("b"), Some(0));
        let mut frame = hb("b", WALL + 2, &[]);
        frame.generation = 1;
        assert_eq!(
            p.receive(1, &frame, back + ms(80), WALL),
            Received::Accepted
        );
        assert_eq!(p.declared("b"), None, "heard in its new generation");
        // Silent in generation 1 for dead_after after its Lease showed it: declared.
        p.declare_silent_members(&[("a", 0), ("b", 1)], true, back + ms(480));
        assert_eq!(p.declared("b"), Some(1));
        // Never heard in a generation its Lease shows: declared dead_after after it appeared.
        let mut q = Peers::new("a", ms(400));
        q.declare_silent_members(&[("a", 0), ("c", 3)], true, t0);
        assert_eq!(q.declared("c"), None);
        q.declare_silent_members(&[("a", 0), ("c", 3)], true, t0 + ms(400));
        assert_eq!(q.declared("c"), Some(3));
    }

    #[test]
    fn a_silent_peer_is_declared_dead_and_ignored_until_it_comes_back_with_a_new_generation() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        let s1 = p.next_seq(t0, WALL);
        p.receive(1, &hb("b", WALL + 1, &[("a", s1)]), t0, WALL);
        p.declare_silent(t0 + ms(399));
        assert_eq!(p.declared("b"), None);
        p.declare_silent(t0 + ms(400));
        assert_eq!(p.declared("b"), Some(0));
        assert_eq!(p.dead_list(), vec![(node_id("b"), 0)]);
        // b's frames of generation 0, even new ones, are ignored from now on.
        assert_eq!(
            p.receive(1, &hb("b", WALL + 2, &[("a", s1)]), t0 + ms(500), WALL),
            Received::Dead
        );
        assert!(!p.is_alive("b", t0 + ms(500)));
        let mut back = hb("b", WALL + 3, &[]);
        back.generation = 1;
        assert_eq!(p.receive(1, &back, t0 + ms(600), WALL), Received::Accepted);
        assert_eq!(p.declared("b"), None);
        assert!(p.is_alive("b", t0 + ms(600)));
        // Others' declarations are read from their frames.
        let mut c = hb("c", WALL + 3, &[]);
        c.dead = vec![(node_id("b"), 1)];
        p.receive(1, &c, t0 + ms(600), WALL);
        assert!(p.reports_dead("c", "b", 1, t0 + ms(600)));
        assert!(!p.reports_dead("c", "b", 2, t0 + ms(600)));
    }

    #[test]
    fn a_new_generation_forgets_the_acks_of_the_old_one() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        let s1 = p.next_seq(t0, WALL);
        p.receive(1, &hb("b", WALL + 1, &[("a", s1)]), t0, WALL);
        assert_eq!(p.hearing_us(t0, ms(300)), vec!["b"]);
        p.set_generation(1);
        assert!(p.hearing_us(t0, ms(300)).is_empty());
    }

    #[test]
    fn who_hears_whom_is_read_from_the_peers_acks() {
        let t0 = Instant::now();
        let mut p = Peers::new("a", ms(400));
        p.receive(1, &hb("b", WALL, &[("c", WALL)]), t0, WALL);
        p.receive(1, &hb("d", WALL, &[]), t0, WALL);
        assert_eq!(p.reporting("c", t0), vec!["b"]);
        assert!(
            p.reporting("c", t0 + ms(400)).is_empty(),
            "b's report is stale"
        );
        p.forget_silent(t0 + FORGET_AFTER);
        assert!(p.get("b").is_none());
    }
}
