//! Notices when someone else changes the speaker's nftables tables: a firewall reload
//! (`nft flush ruleset`, `firewall-cmd --reload`, `systemctl restart nftables`), an admin's
//! `nft delete table`, a configuration manager's `nft -f`.
//!
//! nf_tables announces every committed change on the `NFNLGRP_NFTABLES` multicast group: one
//! message per table, chain, rule, set or element changed, then one `NEWGEN` message naming
//! the process that committed. Only the header and the table name of each message are read
//! (another agent committing to its own tables costs a few header reads); a transaction that
//! touched one of our tables and was committed by a process that is neither this speaker nor
//! an `nft` it started moves a counter, and so does a lost notification (the socket's buffer
//! overflowed: anything may have happened). The DNAT task and the node keeper re-apply their
//! whole state when it moves. A periodic check (see [`CHECK_EVERY`]) covers the rest.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often the DNAT task and the keeper check that their tables exist even when no
/// notification said otherwise (notifications are the fast path; this is the backstop).
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

const NETLINK_NETFILTER: i32 = 12;
const NFNLGRP_NFTABLES: i32 = 7;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
const NFNL_SUBSYS_NFTABLES: u8 = 10;
const NFT_MSG_NEWGEN: u8 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
/// The first attribute of a table, chain, rule, set, element, object or flowtable message
/// (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...) is type 1.
const ATTR_TABLE: u16 = 1;
pub const FAMILY_INET: u8 = 1;
pub const FAMILY_NETDEV: u8 = 5;

/// One of the speaker's tables: its family and name.
pub type TableId = (u8, &'static str);

/// The tables this speaker writes.
pub fn our_tables() -> [TableId; 2] {
    [
        (FAMILY_INET, super::nft::TABLE),
        (FAMILY_NETDEV, super::gate::TABLE),
    ]
}

/// What one notification says, as far as the watcher cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A change to table `name` of `family`.
    Touched { family: u8, name: String },
    /// The end of a transaction, committed by process (thread) `pid`.
    Committed { pid: Option<u32> },
    /// Anything else (another subsystem, a message we do not read).
    Other,
}

fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let item = (ty, &buf[at + 4..at + len]);
        at += (len + 3) & !3;
        Some(item)
    })
}

/// Splits one datagram into notifications (pure).
pub fn parse(datagram: &[u8]) -> Vec<Note> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 20 <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().unwrap_or_default()) as usize;
        if len < 16 || at + len > datagram.len() {
            break;
        }
        let ty = u16::from_ne_bytes([datagram[at + 4], datagram[at + 5]]);
        let family = datagram[at + 16];
        let body = datagram.get(at + 20..at + len).unwrap_or_default();
        let note = if (ty >> 8) as u8 != NFNL_SUBSYS_NFTABLES {
            Note::Other
        } else if ty as u8 == NFT_MSG_NEWGEN {
            let pid = attrs(body)
                .find(|(t, v)| *t == NFTA_GEN_PROC_PID && v.len() == 4)
                .map(|(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            Note::Committed { pid }
        } else {
            match attrs(body).find(|(t, _)| *t == ATTR_TABLE) {
                Some((_, v)) => Note::Touched {
                    family,
                    name: String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v))
                        .into_owned(),
                },
                None => Note::Other,
            }
        };
        out.push(note);
        at += (len + 3) & !3;
    }
    out
}

/// Follows a stream of notifications: whether a transaction that touched one of `ours`
/// came from someone else (pure: `is_own` says which processes are this speaker's).
#[derive(Debug, Default)]
pub struct Tracker {
    touched: bool,
}

impl Tracker {
    /// Feeds one notification; true when a foreign transaction touched our tables.
    pub fn feed(&mut self, note: &Note, ours: &[TableId], is_own: impl Fn(u32) -> bool) -> bool {
        match note {
            Note::Touched { family, name } => {
                if ours.iter().any(|(f, n)| f == family && n == name) {
                    self.touched = true;
                }
                false
            }
            Note::Committed { pid } => {
                let foreign = self.touched && !pid.is_some_and(is_own);
                self.touched = false;
                foreign
            }
            Note::Other => false,
        }
    }
}

/// `nft` processes this speaker started lately (their pids name their transactions).
static CHILDREN: Mutex<VecDeque<(u32, Instant)>> = Mutex::new(VecDeque::new());
/// How long a started `nft`'s pid counts as ours (its notifications come within
/// milliseconds; pids are reused only much later).
const CHILD_MEMORY: Duration = Duration::from_secs(30);

/// Records that this speaker started an `nft` with `pid`.
pub fn started_nft(pid: u32) {
    let mut c = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    while c.front().is_some_and(|(_, t)| now - *t > CHILD_MEMORY) {
        c.pop_front();
    }
    c.push_back((pid, now));
}

/// Whether `pid` (a thread id, as nf_tables reports it) is this process's or an `nft` it
/// started.
pub fn is_own(pid: u32) -> bool {
    if std::path::Path::new(&format!("/proc/self/task/{pid}")).exists() {
        return true;
    }
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(p, _)| *p == pid)
}

/// Starts following nf_tables notifications in this network namespace: the counter moves on
/// every foreign change to one of our tables and on every lost notification. The reading
/// runs on its own thread (a blocking socket; it does nothing between notifications).
pub fn watch_changes() -> io::Result<watch::Receiver<u64>> {
    let fd = subscribe()?;
    let (tx, rx) = watch::channel(0u64);
    std::thread::Builder::new()
        .name("nft-watch".into())
        .spawn(move || follow(fd, tx))?;
    Ok(rx)
}

fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Bound (the kernel picks the port id): nf_tables sends its notifications excluding
    // the committer's port id, and an unbound socket's id 0 is the kernel's own, so an
    // unbound socket would hear nothing.
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value (any port id, no groups).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: bind(2) with a correctly sized sockaddr_nl.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let group: i32 = NFNLGRP_NFTABLES;
    // SAFETY: setsockopt with a correctly sized int.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_ADD_MEMBERSHIP,
            (&group as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // A roomy buffer: a big foreign transaction (a firewall reload) sends a message per
    // rule. Forced where allowed (NET_ADMIN), else what the system allows.
    let size: i32 = 4 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a correctly sized int.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
        if r == 0 {
            break;
        }
    }
    Ok(fd)
}

fn follow(fd: OwnedFd, tx: watch::Sender<u64>) {
    let ours = our_tables();
    let mut tracker = Tracker::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Notifications were dropped: assume the worst.
                Some(libc::ENOBUFS) => {
                    tracker = Tracker::default();
                    tracing::debug!("nftables notifications overran: checking our tables");
                    tx.send_modify(|c| *c += 1);
                    continue;
                }
                _ => {
                    tracing::warn!(error = %e, "stopped following nftables changes");
                    return;
                }
            }
        }
        let mut foreign = false;
        for note in parse(&buf[..n as usize]) {
            foreign |= tracker.feed(&note, &ours, is_own);
        }
        if foreign {
            tx.send_modify(|c| *c += 1);
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(payload);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    fn message(out: &mut Vec<u8>, msg: u8, family: u8, body: &[u8]) {
        out.extend_from_slice(&((20 + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&((10u16 << 8) | msg as u16).to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&[family, 0, 0, 0]);
        out.extend_from_slice(body);
    }

    fn table_msg(out: &mut Vec<u8>, msg: u8, family: u8, table: &str) {
        let mut body = Vec::new();
        attr(&mut body, 1, format!("{table}\0").as_bytes());
        attr(&mut body, 2, b"chain0\0");
        message(out, msg, family, &body);
    }

    fn gen_msg(out: &mut Vec<u8>, pid: u32) {
        let mut body = Vec::new();
        attr(&mut body, 1, &7u32.to_be_bytes());
        attr(&mut body, 2, &pid.to_be_bytes());
        attr(&mut body, 3, b"nft\0");
        message(out, 15, 0, &body);
    }

    #[test]
    fn a_datagram_is_read_as_table_changes_then_the_committer() {
        let mut d = Vec::new();
        table_msg(&mut d, 5, FAMILY_INET, "l2speaker"); // DELCHAIN
        table_msg(&mut d, 2, FAMILY_NETDEV, "other"); // DELTABLE
        gen_msg(&mut d, 4242);
        assert_eq!(
            parse(&d),
            vec![
                Note::Touched {
                    family: FAMILY_INET,
                    name: "l2speaker".into()
                },
                Note::Touched {
                    family: FAMILY_NETDEV,
                    name: "other".into()
                },
                Note::Committed { pid: Some(4242) },
            ]
        );
        assert!(parse(&d[..10]).is_empty(), "a short datagram is no message");
    }

    #[test]
    fn only_a_foreign_transaction_on_our_tables_counts() {
        let ours = our_tables();
        let run = |family: u8, table: &str, pid: u32| {
            let mut d = Vec::new();
            table_msg(&mut d, 2, family, table);
            gen_msg(&mut d, pid);
            let mut t = Tracker::default();
            let notes = parse(&d);
            notes.iter().any(|n| t.feed(n, &ours, |p| p == 1))
        };
        assert!(run(FAMILY_INET, "l2speaker", 99), "someone else's flush");
        assert!(run(FAMILY_NETDEV, "l2speaker_gate", 99));
        assert!(!run(FAMILY_INET, "l2speaker", 1), "our own transaction");
        assert!(!run(FAMILY_INET, "filter", 99), "another agent's own table");
        assert!(
            !run(FAMILY_NETDEV, "l2speaker", 99),
            "same name, another family: not ours"
        );
    }

    #[test]
    fn a_transaction_is_judged_only_by_what_it_touched() {
        let ours = our_tables();
        let mut t = Tracker::default();
        let mine = Note::Touched {
            family: FAMILY_INET,
            name: "l2speaker".into(),
        };
        assert!(!t.feed(&mine, &ours, |_| false));
        assert!(t.feed(&Note::Committed { pid: Some(5) }, &ours, |_| false));
        // The next transaction touched nothing of ours.
        assert!(!t.feed(&Note::Committed { pid: Some(5) }, &ours, |_| false));
        // A commit whose process is unknown counts as foreign.
        t.feed(&mine, &ours, |_| true);
        assert!(t.feed(&Note::Committed { pid: None }, &ours, |_| true));
    }
}
