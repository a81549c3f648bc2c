//! A vCPU of a [`KvmVm`](super::KvmVm) and a minimal runner: real mode, and exits to userspace.

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::{ioctl, KvmError};
use crate::{addr::GuestPhysAddr, memory::GuestMemory};

/// How a [`KvmVcpu::run_until_halt`] ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Exits to userspace (the final `HLT` included).
    pub exits: u64,
    /// Port writes passed to the handler.
    pub io_out: u64,
}

/// A vCPU of a [`KvmVm`].
#[derive(Debug)]
pub struct KvmVcpu {
    // Field order matters: `fd` (which keeps the kernel VM and its slots
    // alive) drops before `_mem`.
    fd: VcpuFd,
    _mem: Arc<GuestMemory>,
}

impl KvmVcpu {
    pub(super) fn new(fd: VcpuFd, mem: Arc<GuestMemory>) -> Self {
        KvmVcpu { fd, _mem: mem }
    }

    /// The vCPU fd, for ioctls this type does not wrap.
    pub fn vcpu_fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Puts the vCPU in 16-bit real mode with every segment based at 0, so
    /// guest-physical address = offset, and `IP` at `entry` (below 64 KiB).
    #[cfg(target_arch = "x86_64")]
    pub fn setup_real_mode(&mut self, entry: GuestPhysAddr) -> Result<(), KvmError> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        let mut regs = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        regs.rip = entry.0;
        regs.rflags = 2; // bit 1 is reserved and must be set
        regs.rsp = 0;
        self.fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Runs until the guest executes `HLT`. Port writes go to `on_io_out`
    /// (port, data); port reads read zeros. Any other exit is an error.
    pub fn run_until_halt(
        &mut self,
        mut on_io_out: impl FnMut(u16, &[u8]),
    ) -> Result<RunReport, KvmError> {
        let mut report = RunReport::default();
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(KvmError::Ioctl {
                        op: "KVM_RUN",
                        source,
                    })
                }
            };
            report.exits += 1;
            match exit {
                VcpuExit::Hlt => return Ok(report),
                VcpuExit::IoOut(port, data) => {
                    report.io_out += 1;
                    on_io_out(port, data);
                }
                VcpuExit::IoIn(_, data) => data.fill(0),
                VcpuExit::Intr => {}
                other => return Err(KvmError::UnhandledExit(format!("{other:?}"))),
            }
        }
    }
}
