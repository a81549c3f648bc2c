//! A mini VMM on KVM over pagefold: several VMs, one vCPU each, running a
//! small 64-bit guest program with its own 4-level page tables (4 KiB and
//! 2 MiB pages). The guests fill their memory with a mix (alike across VMs,
//! zero, unique), give part of it to a balloon, then keep writing to a
//! moving window of it and keep a running checksum. While they run the
//! dedup host folds them across VMs (live statistics; guest writes to
//! shared pages break copy-on-write with no guest-visible effect), the
//! walker translates guest-virtual addresses from each vCPU's CR3, the
//! balloon releases the given-up pages, and VM 0 is live-migrated over TCP
//! into a fresh VM in another process, where it runs on and checks its
//! whole memory against its checksum, reporting through an I/O port.
//!
//! `cargo run --release --example mini_vmm [-- --vms N --data-mib M --fold-secs S]`
//! (needs a usable `/dev/kvm`).

use std::process::{Command, ExitCode};

use pagefold_tools::mini_vmm::{guest, vmm};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a value")),
        None => Ok(default),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = (|| -> guest::Res<()> {
        if let Some(i) = args.iter().position(|a| a == "--receive") {
            let port: u16 = args.get(i + 1).ok_or("--receive PORT")?.parse()?;
            return vmm::receive(port);
        }
        pagefold::kvm::probe().map_err(|e| format!("needs a usable /dev/kvm: {e}"))?;
        let d = vmm::Config::default();
        let cfg = vmm::Config {
            vms: arg(&args, "--vms", d.vms)?,
            data_mib: arg(&args, "--data-mib", d.data_mib)?,
            balloon_mib: arg(&args, "--balloon-mib", d.balloon_mib)?,
            fold_secs: arg(&args, "--fold-secs", d.fold_secs)?,
            fold_goal_sharing: d.fold_goal_sharing,
            verbose: true,
        };
        let exe = std::env::current_exe()?;
        let report = vmm::run(&cfg, &|port| {
            Command::new(&exe)
                .args(["--receive", &port.to_string()])
                .spawn()
        })?;
        let bad = report.verified.iter().any(|&(_, failed)| failed > 0)
            || report.migration.is_none_or(|m| m.failed > 0);
        if bad {
            return Err("a guest's verification failed".into());
        }
        println!("mini_vmm: every guest's memory checked out");
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mini_vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
