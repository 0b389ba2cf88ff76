//! The rules that keep one owner per VIP when liveness travels on the LAN and the API only
//! arbitrates. Pure arithmetic; [`super::node`] and [`super::vip`] apply it.
//!
//! **Members.** The speakers with a node Lease (`node-<node>`) that records a generation
//! (written by a speaker in LAN mode; a speaker of the previous release is no member),
//! whether renewed lately or not: a node that vanished counts until its Lease is deleted (by
//! the operator, for now: nothing collects node Leases yet). Each
//! member has a *generation*, kept in its node Lease and carried in its heartbeats; it changes
//! only by a compare-and-swap write on that Lease.
//!
//! **Declarations are sticky.** A speaker that has not heard a member for `dead_after`
//! declares it dead *at its generation*, says so in every heartbeat, and ignores that
//! member's frames of that generation from then on: it never acks them again.
//!
//! **Owner.** An owner's gate (the kernel switch) is open only while a majority of the members
//! (itself included) hear it: for `majority(n) - 1` other members, the newest ack names a
//! frame of its current generation sent less than `t_ack` ago ([`lan_until`]). A lone member
//! (nobody else has a node Lease) uses its node Lease instead: open until the last successful
//! renewal was sent + the renew deadline. When the gate lapses the owner is *suspended*: it
//! reopens only after a compare-and-swap on its node Lease moves it to the next generation,
//! which fails if anyone fenced the old one (then it drops every VIP).
//!
//! **Take-over.** A candidate may take a VIP from owner O at generation g only when
//! [`dead_by_majority`]: counting itself, at least `n - majority(n) + 1` members declared
//! O@g dead (their own frames say so; the candidate hears them). It then *fences* O@g — a
//! compare-and-swap on O's node Lease recording the fence — and then takes the VIP Lease by
//! compare-and-swap. Two candidates are told apart by the VIP Lease's compare-and-swap; a
//! candidate and a live owner by the node Lease's.
//!
//! **A candidate that hears nobody** (its own link may be the one that failed, and its
//! declarations then say nothing about the others) takes over only from a holder whose node
//! Lease it has also seen unchanged for [`STALE_RENEWALS`] renew intervals: in a two-node
//! cluster the survivor fails over that way, more slowly.
//!
//! **Why it holds.** A majority of acks and a majority of declarations share a member X.
//! X acked a frame of O@g sent at s, so X heard O after s; X declared O@g dead only after not
//! hearing it for `dead_after`, and never acked O@g again. With `t_ack` below `dead_after`
//! (by [`CLOCK_MARGIN`], for clock rates), O's confirmation through X ended before X
//! declared; so when a candidate has its majority of declarations, O has no majority of acks
//! and its gate has already closed — no waiting. O reopens only through a new generation,
//! and the node Lease orders that write against the candidate's fence: if the fence came
//! first, O drops everything; if O's write came first, the fence fails and the candidate
//! starts over with O@g+1. With the API down for everyone, nobody can fence, so nothing moves,
//! and every owner that a majority hears keeps answering.
//!
//! **Late refreshes.** A gate refresh lands at most `gate::TICKET_LIFE` after the clock it
//! was computed from (a ticket the kernel checks), and opens the gate `gate::TICKET_SLACK`
//! shorter than `until`: a freeze between the clock and the send opens nothing afterwards.
//!
//! **What it does not cover** (stated in the README): membership changes seen by some
//! speakers and not others while they are also cut from the API (a new speaker takes part only [`MEMBER_SETTLE`] after its node Lease
//! appeared, by which time connected speakers count it).

use std::time::Duration;

use tokio::time::Instant;

/// A speaker counts as a declarer (and may take over) only this long after its node Lease
/// appeared.
pub const MEMBER_SETTLE: Duration = Duration::from_secs(10);
/// How much shorter an ack lives than a declaration takes: covers clock-rate differences
/// between nodes (100 ppm over a second is 0.1 ms) and the kernel's timeout granularity.
pub const CLOCK_MARGIN: Duration = Duration::from_millis(20);

/// How many renew intervals a holder's node Lease must have stood still before a candidate
/// that hears no other member may take over from it.
pub const STALE_RENEWALS: u32 = 3;

pub fn majority(members: usize) -> usize {
    members / 2 + 1
}

/// Until when the LAN confirms an owner: `acked` holds, for each other member, when we sent
/// the newest of our frames (current generation) it acked. None when a majority is out of
/// reach now, or when there is nobody to ask (a lone member).
pub fn lan_until(members: usize, acked: &[Instant], t_ack: Duration) -> Option<Instant> {
    let need = majority(members).saturating_sub(1);
    if need == 0 {
        return None;
    }
    let mut v = acked.to_vec();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.get(need - 1).map(|t| *t + t_ack)
}

/// Whether `declarers` members (the candidate included, the owner not) declaring the owner
/// dead leave it no majority of `members`.
pub fn dead_by_majority(members: usize, declarers: usize) -> bool {
    members >= 2 && declarers > members - majority(members)
}

/// The ack lifetime for a declaration time: `dead_after - CLOCK_MARGIN`.
pub fn t_ack(dead_after: Duration) -> Duration {
    dead_after.saturating_sub(CLOCK_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_majority_of_acks_meets_any_majority_of_declarations() {
        for n in 2..=9 {
            let acks = majority(n) - 1; // other members acking the owner
            let others = n - 1;
            // The fewest declarers that suffice, and the most that can avoid every acker.
            let need = (0..=others).find(|d| dead_by_majority(n, *d)).unwrap();
            assert!(
                need + acks > others,
                "n={n}: {need} declarers and {acks} ackers fit apart"
            );
            // And it can be reached with the owner dead and everyone else alive.
            assert!(dead_by_majority(n, others), "n={n}");
        }
        assert!(
            !dead_by_majority(1, 0),
            "a lone member has nobody to take over from"
        );
        assert!(
            dead_by_majority(2, 1),
            "two members: the candidate alone decides"
        );
    }

    #[test]
    fn the_owner_is_confirmed_by_its_majority_th_freshest_ack() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let acked = [t0 + ms(100), t0, t0 + ms(50)];
        // 4 members: 2 other acks needed: the second freshest.
        assert_eq!(lan_until(4, &acked, ms(300)), Some(t0 + ms(350)));
        // 5 members: 2 as well; 7 members: 3.
        assert_eq!(lan_until(7, &acked, ms(300)), Some(t0 + ms(300)));
        assert_eq!(lan_until(9, &acked, ms(300)), None);
        assert_eq!(lan_until(1, &[], ms(300)), None);
        assert_eq!(t_ack(ms(400)), ms(380));
    }
}
