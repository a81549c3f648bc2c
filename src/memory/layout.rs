//! Checking a region layout before any memory is made: non-empty, sizes
//! non-zero, aligned to the backing's page, no wrap, no overlap.

use super::error::LayoutError;
use crate::addr::{GuestPhysAddr, PageSize};

/// Checks a layout; returns the region indices sorted by start address.
pub(crate) fn validate_layout(
    layout: &[(GuestPhysAddr, u64)],
    align: u64,
) -> Result<Vec<usize>, LayoutError> {
    if layout.is_empty() {
        return Err(LayoutError::NoRegions);
    }
    let align = align.max(PageSize::Size4K.bytes());
    for (index, &(start, size)) in layout.iter().enumerate() {
        if size == 0 {
            return Err(LayoutError::ZeroSize { index, start });
        }
        if start.0 % align != 0 || size % align != 0 {
            return Err(LayoutError::Misaligned {
                index,
                start,
                size,
                align,
            });
        }
        if start.checked_add(size).is_none() {
            return Err(LayoutError::AddressOverflow { index, start, size });
        }
    }
    let mut order: Vec<usize> = (0..layout.len()).collect();
    order.sort_by_key(|&i| layout[i].0);
    for pair in order.windows(2) {
        let (a, b) = (layout[pair[0]], layout[pair[1]]);
        if b.0 .0 < a.0 .0 + a.1 {
            return Err(LayoutError::Overlap {
                first: pair[0],
                second: pair[1],
                at: b.0,
            });
        }
    }
    Ok(order)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const fn gpa(a: u64) -> GuestPhysAddr {
        GuestPhysAddr(a)
    }

    #[test]
    fn layout_errors_name_the_culprit() {
        let e = |l: &[(GuestPhysAddr, u64)]| validate_layout(l, 4096).unwrap_err();
        assert_eq!(e(&[]), LayoutError::NoRegions);
        assert_eq!(
            e(&[(gpa(0), 4096), (gpa(8192), 0)]),
            LayoutError::ZeroSize {
                index: 1,
                start: gpa(8192)
            }
        );
        assert!(matches!(
            e(&[(gpa(100), 4096)]),
            LayoutError::Misaligned { index: 0, .. }
        ));
        assert!(matches!(
            e(&[(gpa(0), 4097)]),
            LayoutError::Misaligned { .. }
        ));
        assert!(matches!(
            e(&[(gpa(u64::MAX - 4095), 4096)]),
            LayoutError::AddressOverflow { index: 0, .. }
        ));
        assert_eq!(
            e(&[(gpa(0x10000), 0x2000), (gpa(0x9000), 0x8000)]),
            LayoutError::Overlap {
                first: 1,
                second: 0,
                at: gpa(0x10000)
            }
        );
    }
}
