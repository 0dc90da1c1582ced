//! A sha256 whose state can be saved between requests, so an upload can resume in another
//! process (or after a restart) without re-reading the bytes already received.

use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest as _, Sha256};

use super::names::Digest;

#[derive(Clone, Default)]
pub struct BlobHasher(Sha256);

impl BlobHasher {
    pub fn new() -> Self {
        BlobHasher(Sha256::new())
    }

    /// Restores a state written by [`BlobHasher::save`]; None if it is not one.
    pub fn resume(saved: &[u8]) -> Option<Self> {
        let state = saved.try_into().ok()?;
        Sha256::deserialize(state).ok().map(BlobHasher)
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn save(&self) -> Vec<u8> {
        self.0.serialize().to_vec()
    }

    pub fn digest(&self) -> Digest {
        Digest::from_sha256(&self.0.clone().finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumed_state_gives_the_same_digest() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for cut in [0, 1, 63, 64, 65, 4097, 9_999, 10_000] {
            let mut h = BlobHasher::new();
            h.update(&data[..cut]);
            let mut resumed = BlobHasher::resume(&h.save()).unwrap();
            resumed.update(&data[cut..]);
            assert_eq!(resumed.digest(), Digest::sha256_of(&data), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_state_is_refused() {
        assert!(BlobHasher::resume(b"nope").is_none());
    }
}
