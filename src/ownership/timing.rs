//! The timing rule that keeps a dead or frozen owner's address from outliving its Lease.
//!
//! A candidate may take a Lease over `lease` after it last saw the Lease change, and the
//! Lease changed no earlier than the moment its holder *sent* that renewal. So everything
//! an owner does on the strength of a renewal sent at `s` must be over before `s + lease`:
//!
//! - the owner withdraws at `s + renew_deadline` if no later renewal succeeded (self-fencing:
//!   a timer, so it happens whether or not a reply ever comes);
//! - the address it binds expires on its own by `s + lease - MARGIN` even if the process is
//!   killed or frozen: the kernel counts IPv4 lifetimes in whole seconds and removes expired
//!   addresses up to [`KERNEL_GRANULARITY`] late, so the lifetime is
//!   `floor(s + lease - MARGIN - now - KERNEL_GRANULARITY)` whole seconds at the moment of
//!   the refresh, and no refresh happens when that is below one second;
//! - every announcement and every refresh carries a not-after time (`s + renew_deadline`)
//!   and is dropped when it is already late.
//!
//! Whether a configuration can keep that promise without flapping is checked at start-up by
//! [`Timing::check`]: the address must live at least one renew interval with ordinary API
//! latency. With a 1-second lease no address lifetime is safe, which retires the old fast
//! profile.

use std::time::Duration;

use tokio::time::Instant;

/// How late the kernel may remove an expired IPv4 address (its lifetime check runs on a
/// timer rounded to whole seconds).
pub const KERNEL_GRANULARITY: Duration = Duration::from_secs(1);
/// Slack for scheduling between a decision and its effect.
pub const MARGIN: Duration = Duration::from_millis(100);
/// The API latency the start-up check assumes for a renewal in ordinary operation.
pub const ORDINARY_LATENCY: Duration = Duration::from_millis(100);
/// How long a release (graceful stop, step-down) may take before we give up on it.
pub const RELEASE_DEADLINE: Duration = Duration::from_millis(800);

/// The timings of one Lease holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub lease: Duration,
    pub renew_interval: Duration,
    pub renew_deadline: Duration,
}

impl Timing {
    /// The latest moment anything done on the strength of a write sent at `sent` may last.
    pub fn address_until(&self, sent: Instant) -> Instant {
        sent + self.lease - MARGIN
    }

    /// Refuses timings where a dead speaker's address could outlive its Lease, or where the
    /// address would lapse between two ordinary renewals.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_interval >= self.renew_deadline {
            return Err(format!(
                "the renew interval ({} ms) must be below the renew deadline ({} ms)",
                self.renew_interval.as_millis(),
                self.renew_deadline.as_millis()
            ));
        }
        if self.renew_deadline + MARGIN > self.lease {
            return Err(format!(
                "the renew deadline ({} ms) plus a {} ms margin must not exceed the lease \
                 duration ({} s): an owner must withdraw before anyone may take over",
                self.renew_deadline.as_millis(),
                MARGIN.as_millis(),
                self.lease.as_secs()
            ));
        }
        let ordinary = lifetime(
            Instant::now(),
            self.address_until(Instant::now()),
            ORDINARY_LATENCY,
        );
        match ordinary {
            Some(l) if l >= self.renew_interval + ORDINARY_LATENCY => Ok(()),
            _ => Err(format!(
                "a {} s lease leaves no safe address lifetime that outlives a {} ms renew \
                 interval: the kernel keeps an expired address up to {} s, so the lifetime \
                 must be at most lease - {} ms - 1 s - the renewal's latency, in whole seconds \
                 (use --lease-duration 4 with --renew-interval 1000, or --lease-duration 3 \
                 with --renew-interval 500 or less)",
                self.lease.as_secs(),
                self.renew_interval.as_millis(),
                KERNEL_GRANULARITY.as_secs(),
                MARGIN.as_millis(),
            )),
        }
    }
}

/// The valid lifetime of a LAN-mode VIP address: the node keeper extends it every
/// [`LAN_ADDRESS_REFRESH`], so a speaker that died leaves its addresses for at most this
/// plus the kernel's second of lateness. The gate silences that node much sooner; this is
/// what still holds when the gate is gone too (a `flush ruleset` after the speaker died
/// removes the orphaned table).
pub const LAN_ADDRESS_LIFETIME: Duration = Duration::from_secs(3);
/// How often the keeper extends LAN-mode VIP address lifetimes: two refreshes may be lost
/// (a speaker starved of CPU) before an address expires.
pub const LAN_ADDRESS_REFRESH: Duration = Duration::from_secs(1);
/// The same for an IPv6 VIP address. Linux runs every RTM_NEWADDR for IPv6, a lifetime
/// refresh too, through `ipv6_mc_up`, which re-adds every multicast group of the interface
/// (each VIP's solicited-node group among them) and schedules MLD reports for all: the cost
/// of one refresh grows with the number of IPv6 VIPs on the link, and a refresh of all of
/// them every second took ~6 % of a core at 333 IPv6 VIPs. So IPv6 addresses live longer
/// and are extended a fifth as often (two refreshes may still be lost).
pub const LAN_ADDRESS_LIFETIME_V6: Duration = Duration::from_secs(15);
pub const LAN_ADDRESS_REFRESH_V6: Duration = Duration::from_secs(5);

/// [`LAN_ADDRESS_LIFETIME`] or [`LAN_ADDRESS_LIFETIME_V6`], by the family of `ip`.
pub fn lan_address_lifetime(ip: std::net::IpAddr) -> Duration {
    if ip.is_ipv4() {
        LAN_ADDRESS_LIFETIME
    } else {
        LAN_ADDRESS_LIFETIME_V6
    }
}

/// [`LAN_ADDRESS_REFRESH`] or [`LAN_ADDRESS_REFRESH_V6`], by the family of `ip`.
pub fn lan_address_refresh(ip: std::net::IpAddr) -> Duration {
    if ip.is_ipv4() {
        LAN_ADDRESS_REFRESH
    } else {
        LAN_ADDRESS_REFRESH_V6
    }
}

/// The valid lifetime to give an address at `now` (after `latency` more to reach the
/// kernel) so that it is surely gone by `until`; None when not even one second is safe.
pub fn lifetime(now: Instant, until: Instant, latency: Duration) -> Option<Duration> {
    let left = until.checked_duration_since(now + latency + KERNEL_GRANULARITY)?;
    let secs = left.as_secs();
    (secs >= 1).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(lease: u64, interval: u64, deadline: u64) -> Timing {
        Timing {
            lease: Duration::from_secs(lease),
            renew_interval: Duration::from_millis(interval),
            renew_deadline: Duration::from_millis(deadline),
        }
    }

    #[test]
    fn the_default_profile_passes_and_a_one_second_lease_never_does() {
        assert_eq!(t(4, 1000, 2000).check(), Ok(()));
        assert_eq!(t(3, 500, 1500).check(), Ok(()));
        let e = t(1, 250, 750).check().unwrap_err();
        assert!(e.contains("no safe address lifetime"), "{e}");
        // the previous defaults: the address (2 s) could outlive the 3 s lease by up to 1 s
        assert!(t(3, 1000, 2000).check().is_err());
        assert!(t(4, 1000, 3950).check().unwrap_err().contains("withdraw"));
        assert!(t(4, 2000, 2000).check().is_err());
    }

    #[test]
    fn a_lifetime_ends_before_the_lease_can_move_counting_the_kernel_being_late() {
        let s = Instant::now();
        let timing = t(4, 1000, 2000);
        let until = timing.address_until(s);
        for reply_after_ms in [0u64, 10, 400, 899, 900, 1500, 1999] {
            let now = s + Duration::from_millis(reply_after_ms);
            if let Some(l) = lifetime(now, until, Duration::ZERO) {
                // worst case: the kernel removes it a whole granularity late
                assert!(now + l + KERNEL_GRANULARITY <= s + timing.lease - MARGIN);
            }
        }
        assert_eq!(
            lifetime(s, until, Duration::ZERO),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            lifetime(s + Duration::from_millis(950), until, Duration::ZERO),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            lifetime(s + Duration::from_millis(1950), until, Duration::ZERO),
            None
        );
    }
}
