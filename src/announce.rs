//! The announcement burst after taking a VIP: gratuitous ARP / unsolicited NA at once, then
//! spaced over a few seconds (a client that missed one, or whose entry is locked for
//! `locktime`, catches a later one). The ownership state machine emits each round itself,
//! with the owner's fence time as its not-after, so a round is never sent once ownership
//! is lost.

use std::time::Duration;

use tokio::time::Instant;

/// When each round is sent, after taking a VIP.
pub const BURST: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// When round `round` of a burst that started at `start` is due (None: the burst is over).
pub fn round_at(start: Instant, round: usize) -> Option<Instant> {
    BURST.get(round).map(|d| start + *d)
}
