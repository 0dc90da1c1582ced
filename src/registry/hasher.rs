//! A sha256 or sha512 whose state can be saved between requests, so an upload can resume in
//! another process (or after a restart) without re-reading the bytes already received.

use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest as _, Sha256, Sha512};

use super::names::{Algorithm, Digest};

#[derive(Clone)]
pub enum BlobHasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Default for BlobHasher {
    fn default() -> Self {
        BlobHasher::new(Algorithm::Sha256)
    }
}

impl BlobHasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => BlobHasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => BlobHasher::Sha512(Sha512::new()),
        }
    }

    /// Restores a state written by [`BlobHasher::save`]; None if it is not one. The two
    /// algorithms' states differ in length, which tells them apart (sessions saved before
    /// sha512 existed are sha256 states).
    pub fn resume(saved: &[u8]) -> Option<Self> {
        if let Ok(state) = saved.try_into() {
            return Sha256::deserialize(state).ok().map(BlobHasher::Sha256);
        }
        let state = saved.try_into().ok()?;
        Sha512::deserialize(state).ok().map(BlobHasher::Sha512)
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            BlobHasher::Sha256(_) => Algorithm::Sha256,
            BlobHasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            BlobHasher::Sha256(h) => h.update(bytes),
            BlobHasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn save(&self) -> Vec<u8> {
        match self {
            BlobHasher::Sha256(h) => h.serialize().to_vec(),
            BlobHasher::Sha512(h) => h.serialize().to_vec(),
        }
    }

    pub fn digest(&self) -> Digest {
        match self {
            BlobHasher::Sha256(h) => Digest::from_raw(Algorithm::Sha256, &h.clone().finalize()),
            BlobHasher::Sha512(h) => Digest::from_raw(Algorithm::Sha512, &h.clone().finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumed_state_gives_the_same_digest() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            for cut in [0, 1, 63, 64, 65, 127, 128, 129, 4097, 9_999, 10_000] {
                let mut h = BlobHasher::new(algorithm);
                h.update(&data[..cut]);
                let mut resumed = BlobHasher::resume(&h.save()).unwrap();
                assert_eq!(resumed.algorithm(), algorithm);
                resumed.update(&data[cut..]);
                assert_eq!(
                    resumed.digest(),
                    Digest::of(algorithm, &data),
                    "{algorithm:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn garbage_state_is_refused() {
        assert!(BlobHasher::resume(b"nope").is_none());
    }
}
