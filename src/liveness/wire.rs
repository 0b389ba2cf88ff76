//! The heartbeat frame: what one speaker tells the LAN every interval, signed.
//!
//! ```text
//! "L2SH" | version u8 | flags u8 | interval_ms u16 | seq u64 | generation u32
//!        | name_len u8 | name
//!        | ack_count u16 | (peer u32 | seq u64) × ack_count
//!        | dead_count u16 | (peer u32 | generation u32) × dead_count
//!        | mac_count u8 | (key u32 | HMAC-SHA256 [32]) × mac_count
//! ```
//! Big-endian. Each MAC covers every byte before `mac_count`. A frame carries one MAC per key
//! the sender holds, so adding a key to the Secret, then removing the old one, rotates keys
//! without a single heartbeat that some peer cannot check. `seq` grows by one per frame sent
//! (on any interface) and starts at the sender's wall clock in microseconds, so a restarted
//! speaker continues above its previous frames and a recorded frame replayed later is
//! refused. An ack names the newest frame heard from a peer, so the peer knows how fresh the
//! ack is: as fresh as the frame it names. `generation` is the sender's generation (see
//! [`crate::ownership::quorum`]); `dead` lists the peers the sender has declared dead, each at
//! the generation it was declared dead in.

use ring::hmac;

pub const MAGIC: &[u8; 4] = b"L2SH";
pub const VERSION: u8 = 1;
/// The largest UDP payload that fits a 1,500-byte Ethernet frame over IPv4.
pub const MAX_FRAME: usize = 1472;
pub const MAX_KEYS: usize = 4;
const MAC_LEN: usize = 32;
const ACK_LEN: usize = 12;
const DEAD_LEN: usize = 8;

/// A peer's short identity in acks: the first four bytes of SHA-256 of its node name.
pub type NodeId = u32;

pub fn node_id(name: &str) -> NodeId {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    u32::from_be_bytes([d.as_ref()[0], d.as_ref()[1], d.as_ref()[2], d.as_ref()[3]])
}

/// One signing key with its short id (the first four bytes of SHA-256 of the key).
#[derive(Clone)]
pub struct Key {
    pub id: u32,
    key: hmac::Key,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:08x})", self.id)
    }
}

impl Key {
    pub fn new(secret: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, secret);
        let id = u32::from_be_bytes([d.as_ref()[0], d.as_ref()[1], d.as_ref()[2], d.as_ref()[3]]);
        Key {
            id,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub node: String,
    pub seq: u64,
    pub generation: u32,
    pub interval_ms: u16,
    /// (peer, the newest seq heard from it).
    pub acks: Vec<(NodeId, u64)>,
    /// (peer, the generation in which we declared it dead).
    pub dead: Vec<(NodeId, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not a heartbeat of this version")]
    Malformed,
    #[error("signed with no key we hold")]
    UnknownKey,
    #[error("a signature does not verify")]
    Forged,
}

impl Rejected {
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::UnknownKey => "unknown_key",
            Rejected::Forged => "forged",
        }
    }
}

/// The frame for `hb`, signed with every key in `keys`. Declarations are all kept (the frame
/// holds 170 of them with no acks); acks that would not fit [`MAX_FRAME`] are left out (the
/// caller orders them, most needed first); the number of acks kept is returned.
pub fn encode(hb: &Heartbeat, keys: &[Key]) -> (Vec<u8>, usize) {
    let keys = &keys[..keys.len().min(MAX_KEYS)];
    let name = &hb.node.as_bytes()[..hb.node.len().min(255)];
    let mut out = Vec::with_capacity(64 + hb.acks.len() * ACK_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(0);
    out.extend_from_slice(&hb.interval_ms.to_be_bytes());
    out.extend_from_slice(&hb.seq.to_be_bytes());
    out.extend_from_slice(&hb.generation.to_be_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    let tail = 2 + 2 + 1 + keys.len() * (4 + MAC_LEN);
    let dead_room = MAX_FRAME.saturating_sub(out.len() + tail) / DEAD_LEN;
    let dead = &hb.dead[..hb.dead.len().min(dead_room)];
    let room = MAX_FRAME.saturating_sub(out.len() + tail + dead.len() * DEAD_LEN) / ACK_LEN;
    let n = hb.acks.len().min(room).min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for (id, seq) in &hb.acks[..n] {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
    }
    out.extend_from_slice(&(dead.len() as u16).to_be_bytes());
    for (id, generation) in dead {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&generation.to_be_bytes());
    }
    let body = out.len();
    out.push(keys.len() as u8);
    for k in keys {
        let tag = hmac::sign(&k.key, &out[..body]);
        out.extend_from_slice(&k.id.to_be_bytes());
        out.extend_from_slice(tag.as_ref());
    }
    (out, n)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Rejected> {
        if self.0.len() < n {
            return Err(Rejected::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Rejected> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Rejected> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, Rejected> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, Rejected> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
}

/// Parses and authenticates a frame: it is accepted only if a MAC made with a key in `keys`
/// verifies (the first MAC whose key we hold decides).
pub fn decode(frame: &[u8], keys: &[Key]) -> Result<Heartbeat, Rejected> {
    let mut r = Reader(frame);
    if r.take(4)? != MAGIC || r.u8()? != VERSION {
        return Err(Rejected::Malformed);
    }
    let _flags = r.u8()?;
    let interval_ms = r.u16()?;
    let seq = r.u64()?;
    let generation = r.u32()?;
    let len = r.u8()? as usize;
    let node = std::str::from_utf8(r.take(len)?)
        .map_err(|_| Rejected::Malformed)?
        .to_string();
    let n = r.u16()? as usize;
    let mut acks = Vec::with_capacity(n.min(MAX_FRAME / ACK_LEN));
    for _ in 0..n {
        acks.push((r.u32()?, r.u64()?));
    }
    let n = r.u16()? as usize;
    let mut dead = Vec::with_capacity(n.min(MAX_FRAME / DEAD_LEN));
    for _ in 0..n {
        dead.push((r.u32()?, r.u32()?));
    }
    let body = frame.len() - r.0.len();
    let macs = r.u8()? as usize;
    if macs == 0 || macs > MAX_KEYS || r.0.len() != macs * (4 + MAC_LEN) {
        return Err(Rejected::Malformed);
    }
    for _ in 0..macs {
        let id = r.u32()?;
        let tag = r.take(MAC_LEN)?;
        if let Some(k) = keys.iter().find(|k| k.id == id) {
            return match hmac::verify(&k.key, &frame[..body], tag) {
                Ok(()) => Ok(Heartbeat {
                    node,
                    seq,
                    generation,
                    interval_ms,
                    acks,
                    dead,
                }),
                Err(_) => Err(Rejected::Forged),
            };
        }
    }
    Err(Rejected::UnknownKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(acks: usize) -> Heartbeat {
        Heartbeat {
            node: "node-a".into(),
            seq: 1_764_000_000_000_000,
            generation: 3,
            interval_ms: 100,
            acks: (0..acks as u32).map(|i| (i, u64::from(i) * 7)).collect(),
            dead: vec![(9, 2)],
        }
    }

    #[test]
    fn a_signed_frame_round_trips() {
        let k = Key::new(b"0123456789abcdef0123456789abcdef");
        let (f, n) = encode(&hb(3), std::slice::from_ref(&k));
        assert_eq!(n, 3);
        assert_eq!(decode(&f, &[k]).unwrap(), hb(3));
    }

    #[test]
    fn a_frame_signed_with_another_key_or_changed_after_signing_is_refused() {
        let k = Key::new(b"0123456789abcdef0123456789abcdef");
        let other = Key::new(b"another key, also long enough..");
        let (f, _) = encode(&hb(2), std::slice::from_ref(&other));
        assert_eq!(
            decode(&f, std::slice::from_ref(&k)),
            Err(Rejected::UnknownKey)
        );
        let (mut f, _) = encode(&hb(2), std::slice::from_ref(&k));
        // Someone who knows the format but not the key raises the seq by one.
        f[15] ^= 1;
        assert_eq!(decode(&f, std::slice::from_ref(&k)), Err(Rejected::Forged));
        // A forger who copies a real MAC onto a frame of its own.
        let (real, _) = encode(&hb(0), std::slice::from_ref(&k));
        let mut fake = hb(0);
        fake.node = "node-b".into();
        let (mut f, _) = encode(&fake, std::slice::from_ref(&other));
        let mac_at = f.len() - 36;
        f.truncate(mac_at);
        f.extend_from_slice(&real[real.len() - 36..]);
        assert_eq!(decode(&f, &[k]), Err(Rejected::Forged));
    }

    #[test]
    fn during_a_rotation_a_frame_carries_both_macs_and_either_key_checks_it() {
        let old = Key::new(b"the old key, thirty-two bytes ok");
        let new = Key::new(b"the new key, thirty-two bytes ok");
        let (f, _) = encode(&hb(1), &[old.clone(), new.clone()]);
        assert_eq!(decode(&f, std::slice::from_ref(&old)).unwrap(), hb(1));
        assert_eq!(decode(&f, std::slice::from_ref(&new)).unwrap(), hb(1));
    }

    #[test]
    fn acks_that_do_not_fit_one_ethernet_frame_are_left_out() {
        let k = Key::new(b"0123456789abcdef0123456789abcdef");
        let (f, n) = encode(&hb(500), std::slice::from_ref(&k));
        assert!(f.len() <= MAX_FRAME, "{}", f.len());
        assert!((110..500).contains(&n), "{n}");
        assert_eq!(decode(&f, &[k]).unwrap().acks.len(), n);
    }

    #[test]
    fn truncated_or_padded_frames_are_malformed_not_a_panic() {
        let k = Key::new(b"0123456789abcdef0123456789abcdef");
        let (f, _) = encode(&hb(4), std::slice::from_ref(&k));
        for cut in 0..f.len() {
            assert!(
                decode(&f[..cut], std::slice::from_ref(&k)).is_err(),
                "{cut}"
            );
        }
        let mut long = f.clone();
        long.push(0);
        assert_eq!(decode(&long, &[k]), Err(Rejected::Malformed));
    }
}
