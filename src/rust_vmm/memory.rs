//! A pagefold memory as vm-memory's `GuestMemoryBackend`: region lookup by
//! pagefold's own index (O(1) for even layouts, where vm-memory's
//! collection searches), so vm-memory's `GuestMemory` and `Bytes` come
//! with it.

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::{
    addr::GuestPhysAddr,
    memory::{GuestMemory, GuestRegion},
};

impl GuestMemoryBackend for GuestMemory {
    type R = GuestRegion;

    #[inline]
    fn num_regions(&self) -> usize {
        self.regions().len()
    }

    #[inline(always)]
    fn find_region(&self, addr: GuestAddress) -> Option<&GuestRegion> {
        self.find_region(GuestPhysAddr(addr.0))
            .and_then(|i| self.regions().get(i))
            .map(|r| &**r)
    }

    #[inline]
    fn iter(&self) -> impl Iterator<Item = &GuestRegion> {
        self.regions().iter().map(|r| &**r)
    }
}

impl From<GuestAddress> for GuestPhysAddr {
    #[inline]
    fn from(a: GuestAddress) -> Self {
        GuestPhysAddr(a.0)
    }
}

impl From<GuestPhysAddr> for GuestAddress {
    #[inline]
    fn from(a: GuestPhysAddr) -> Self {
        GuestAddress(a.0)
    }
}
