//! Per-domain hash keys. Each merge domain hashes page contents with xxh3
//! under its own secret from the OS random source, so a guest can neither
//! predict another domain's hashes nor craft pages that collide in the index
//! (collisions would only cost time: bytes are always compared before a
//! merge). The key never leaves this module.

use xxhash_rust::xxh3::xxh3_64_with_secret;

use crate::addr::PAGE_SIZE;

/// Bytes of xxh3 secret per domain (the algorithm's default secret size).
const SECRET_LEN: usize = 192;

/// A domain's secret hashing key.
pub(crate) struct DomainKey {
    secret: Box<[u8; SECRET_LEN]>,
    /// The hash of an all-zero page under this key, to spot zero pages.
    zero_hash: u64,
}

impl std::fmt::Debug for DomainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainKey(<secret>)")
    }
}

impl DomainKey {
    /// A fresh key from the OS random source.
    pub(crate) fn random() -> Result<Self, getrandom::Error> {
        let mut secret = Box::new([0u8; SECRET_LEN]);
        getrandom::fill(&mut secret[..])?;
        let zero_hash = xxh3_64_with_secret(&[0u8; PAGE_SIZE], &secret[..]);
        Ok(DomainKey { secret, zero_hash })
    }

    /// Keyed hash of one page.
    #[inline]
    pub(crate) fn hash(&self, page: &[u8]) -> u64 {
        xxh3_64_with_secret(page, &self.secret[..])
    }

    /// The hash of the zero page under this key.
    #[inline]
    pub(crate) fn zero_hash(&self) -> u64 {
        self.zero_hash
    }

    /// Whether `hash` is the hash of the zero page (bytes still need checking).
    #[inline]
    pub(crate) fn may_be_zero(&self, hash: u64) -> bool {
        hash == self.zero_hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_domain_and_spot_zero_pages() {
        let a = DomainKey::random().unwrap();
        let b = DomainKey::random().unwrap();
        let page = [7u8; PAGE_SIZE];
        assert_ne!(a.hash(&page), b.hash(&page), "independent secrets");
        assert_eq!(a.hash(&page), a.hash(&page));
        assert!(a.may_be_zero(a.hash(&[0u8; PAGE_SIZE])));
        assert!(!a.may_be_zero(a.hash(&page)));
    }
}
