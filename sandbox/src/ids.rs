//! Deterministic identifiers derived from the configured seed.
//!
//! Every id the sandbox makes up is a SHA-256 of the seed, a label saying
//! what the id is for, and a counter kept in the persisted state, so a run
//! with the same seed and the same calls produces the same ids.

use sha2::{Digest, Sha256};

/// 32 pseudo-random bytes for `(seed, label, n)`.
pub(crate) fn derive(seed: u64, label: &str, n: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update((label.len() as u64).to_le_bytes());
    hasher.update(label.as_bytes());
    hasher.update(n.to_le_bytes());
    hasher.finalize().into()
}

/// A version-4-shaped UUID string (36 characters) for `(seed, label, n)`.
pub(crate) fn uuid(seed: u64, label: &str, n: u64) -> String {
    let mut b = derive(seed, label, n);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(&b[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A positive certificate serial number of 16 octets for `(seed, label, n)`.
pub(crate) fn serial(seed: u64, label: &str, n: u64) -> [u8; 16] {
    let b = derive(seed, label, n);
    let mut serial = [0u8; 16];
    serial.copy_from_slice(&b[..16]);
    // Positive (top bit clear) and exactly 16 octets long (second bit set).
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape_and_determinism() {
        let a = uuid(7, "task", 1);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert_eq!(a, uuid(7, "task", 1));
        assert_ne!(a, uuid(7, "task", 2));
        assert_ne!(a, uuid(8, "task", 1));
    }

    #[test]
    fn serial_is_positive() {
        for n in 0..100 {
            let s = serial(1, "cert", n);
            assert!(s[0] & 0x80 == 0 && s[0] != 0);
        }
    }
}
