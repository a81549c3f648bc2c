//! C ABI of pagefold.
