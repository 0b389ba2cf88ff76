//! The heartbeat keys: every entry of one Secret is a key. Frames are signed with all of them
//! and accepted if any checks, so a rotation is "add the new key, wait, remove the old one".
//! A key that leaves the Secret is still accepted for [`KEY_GRACE`], so a speaker that sees
//! the change before its peers do does not refuse their frames meanwhile. If the Secret does
//! not exist, the first speaker creates it with a random key (the others read it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use super::wire::{Key, MAX_KEYS};

/// The Secret in the speaker's namespace.
pub const SECRET: &str = "l2speaker-heartbeat";
/// Shorter entries are not keys (a typo, an empty value): refused with a log line.
pub const MIN_KEY_BYTES: usize = 16;
pub const KEY_GRACE: Duration = Duration::from_secs(60);

/// The keys in a Secret's data, by entry name; and the entries refused, with why.
pub fn keys_from(data: &BTreeMap<String, ByteString>) -> (Vec<Key>, Vec<String>) {
    let mut keys = Vec::new();
    let mut refused = Vec::new();
    for (name, v) in data {
        if v.0.len() < MIN_KEY_BYTES {
            refused.push(format!(
                "{name}: {} bytes, a key needs at least {MIN_KEY_BYTES}",
                v.0.len()
            ));
        } else if keys.len() == MAX_KEYS {
            refused.push(format!("{name}: at most {MAX_KEYS} keys are used"));
        } else {
            keys.push(Key::new(&v.0));
        }
    }
    (keys, refused)
}

#[derive(Debug, Default)]
pub struct Keyring {
    current: Vec<Key>,
    retired: Vec<(Key, Instant)>,
}

impl Keyring {
    /// The Secret's keys are now `keys`; keys that left it are kept for checking a while.
    pub fn update(&mut self, keys: Vec<Key>, now: Instant) {
        for old in std::mem::take(&mut self.current) {
            if !keys.iter().any(|k| k.id == old.id) {
                self.retired.push((old, now));
            }
        }
        self.retired
            .retain(|(k, _)| !keys.iter().any(|n| n.id == k.id));
        self.current = keys;
    }

    pub fn signing(&self) -> &[Key] {
        &self.current
    }

    pub fn checking(&mut self, now: Instant) -> Vec<Key> {
        self.retired
            .retain(|(_, at)| now.saturating_duration_since(*at) < KEY_GRACE);
        let mut v = self.current.clone();
        v.extend(self.retired.iter().map(|(k, _)| k.clone()));
        v
    }
}

/// Reads the Secret, creating it with a fresh random key if there is none.
pub async fn ensure(api: &Api<Secret>) -> Result<Secret, kube::Error> {
    if let Some(s) = api.get_opt(SECRET).await? {
        return Ok(s);
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| kube::Error::Service("no randomness for a heartbeat key".into()))?;
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "l2speaker".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "key".to_string(),
            ByteString(key.to_vec()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &s).await {
        Ok(s) => Ok(s),
        // Another speaker created it first: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(SECRET).await,
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(entries: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
        entries
            .iter()
            .map(|(n, v)| (n.to_string(), ByteString(v.to_vec())))
            .collect()
    }

    #[test]
    fn short_entries_are_refused_with_a_reason() {
        let (keys, refused) = keys_from(&data(&[("key", b"0123456789abcdef"), ("typo", b"short")]));
        assert_eq!(keys.len(), 1);
        assert_eq!(
            refused,
            vec!["typo: 5 bytes, a key needs at least 16".to_string()]
        );
    }

    #[test]
    fn a_removed_key_is_still_accepted_for_the_grace_period_only() {
        let t0 = Instant::now();
        let (old, _) = keys_from(&data(&[("key", b"0123456789abcdef")]));
        let (new, _) = keys_from(&data(&[("key2", b"fedcba9876543210")]));
        let mut ring = Keyring::default();
        ring.update(old.clone(), t0);
        ring.update(new.clone(), t0 + Duration::from_secs(1));
        assert_eq!(ring.signing().len(), 1);
        assert_eq!(ring.signing()[0].id, new[0].id);
        let ids = |v: Vec<Key>| v.iter().map(|k| k.id).collect::<Vec<_>>();
        assert_eq!(
            ids(ring.checking(t0 + Duration::from_secs(2))),
            vec![new[0].id, old[0].id]
        );
        assert_eq!(
            ids(ring.checking(t0 + KEY_GRACE + Duration::from_secs(1))),
            vec![new[0].id]
        );
        // Put back: current again, not twice.
        ring.update(vec![new[0].clone(), old[0].clone()], t0);
        assert_eq!(ring.checking(t0).len(), 2);
    }
}
