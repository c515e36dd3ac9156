//! What this host offers for running guests (`vmrun --check-host`): CPU,
//! virtualisation extension, KVM flavour, /dev/kvm access, API version and
//! the capabilities vmrun relies on.

use std::fs::OpenOptions;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

/// One capability and whether KVM has it.
#[derive(Clone, Debug, Serialize)]
pub struct CapState {
    pub name: &'static str,
    pub present: bool,
    /// Needed to run guests at all.
    pub required: bool,
}

/// The host report.
#[derive(Clone, Debug, Serialize)]
pub struct HostReport {
    pub cpu_vendor: String,
    pub cpu_model: String,
    /// `vmx`, `svm` or `none`.
    pub virt_extension: String,
    /// `kvm_intel`, `kvm_amd`, `kvm_pvm` or `none`.
    pub kvm_module: String,
    pub nested_pvm: bool,
    pub dev_kvm: String,
    pub dev_kvm_access: bool,
    pub api_version: Option<i32>,
    pub max_vcpus: Option<usize>,
    pub capabilities: Vec<CapState>,
    /// Why guests cannot run, if they cannot.
    pub problems: Vec<String>,
}

impl HostReport {
    /// Whether guests can run.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn cpuinfo_field(cpuinfo: &str, key: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Examine the host; `root` is `/` except in tests.
pub fn check(root: &Path) -> HostReport {
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let flags = cpuinfo_field(&cpuinfo, "flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let virt = if has("vmx") {
        "vmx"
    } else if has("svm") {
        "svm"
    } else {
        "none"
    };
    let module = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| root.join("sys/module").join(m).exists())
        .unwrap_or("none");
    let dev = root.join("dev/kvm");
    let mut problems = Vec::new();
    let access = OpenOptions::new().read(true).write(true).open(&dev);
    let dev_kvm_access = access.is_ok();
    if let Err(e) = &access {
        problems.push(format!("cannot open {} read-write: {e}", dev.display()));
    }
    let mut api = None;
    let mut max_vcpus = None;
    let mut caps = Vec::new();
    if dev_kvm_access && root == Path::new("/") {
        match Kvm::new() {
            Ok(kvm) => {
                api = Some(kvm.get_api_version());
                if kvm.get_api_version() != 12 {
                    problems.push(format!(
                        "KVM API version {} (12 needed)",
                        kvm.get_api_version()
                    ));
                }
                max_vcpus = Some(kvm.get_max_vcpus());
                for (name, cap, required) in [
                    ("KVM_CAP_IRQCHIP", Cap::Irqchip, true),
                    ("KVM_CAP_PIT2", Cap::Pit2, true),
                    ("KVM_CAP_USER_MEMORY", Cap::UserMemory, true),
                    ("KVM_CAP_IRQFD", Cap::Irqfd, true),
                    ("KVM_CAP_IOEVENTFD", Cap::Ioeventfd, false),
                    ("KVM_CAP_IRQ_ROUTING", Cap::IrqRouting, false),
                    ("KVM_CAP_EXT_CPUID", Cap::ExtCpuid, true),
                    ("KVM_CAP_SIGNAL_MSI", Cap::SignalMsi, false),
                    ("KVM_CAP_TSC_CONTROL", Cap::TscControl, false),
                    ("KVM_CAP_IMMEDIATE_EXIT", Cap::ImmediateExit, false),
                ] {
                    let present = kvm.check_extension(cap);
                    if required && !present {
                        problems.push(format!("KVM lacks {name}"));
                    }
                    caps.push(CapState {
                        name,
                        present,
                        required,
                    });
                }
            }
            Err(e) => problems.push(format!("KVM_GET_API_VERSION failed: {e}")),
        }
    }
    HostReport {
        cpu_vendor: cpuinfo_field(&cpuinfo, "vendor_id"),
        cpu_model: cpuinfo_field(&cpuinfo, "model name"),
        virt_extension: virt.into(),
        kvm_module: module.into(),
        nested_pvm: module == "kvm_pvm",
        dev_kvm: dev.display().to_string(),
        dev_kvm_access,
        api_version: api,
        max_vcpus,
        capabilities: caps,
        problems,
    }
}

/// The human-readable report.
pub fn format(r: &HostReport) -> String {
    let mut s = String::new();
    let yn = |b: bool| if b { "yes" } else { "no" };
    s += &format!("CPU:                 {} ({})\n", r.cpu_model, r.cpu_vendor);
    s += &format!("Virtualisation:      {}\n", r.virt_extension);
    let flavour = match r.kvm_module.as_str() {
        "kvm_pvm" => "kvm_pvm (nested, paging-based: guest kernel code is emulated; vmrun applies its workarounds)",
        "none" => "none loaded",
        other => other,
    };
    s += &format!("KVM module:          {flavour}\n");
    s += &format!(
        "{:<21}{}\n",
        format!("{} access:", r.dev_kvm),
        yn(r.dev_kvm_access)
    );
    if let Some(v) = r.api_version {
        s += &format!("KVM API version:     {v}\n");
    }
    if let Some(v) = r.max_vcpus {
        s += &format!("Max vCPUs per guest: {v}\n");
    }
    for c in &r.capabilities {
        s += &format!("{:<21}{}\n", format!("{}:", c.name), yn(c.present));
    }
    if r.ok() {
        s += "Guests can run: yes\n";
    } else {
        s += "Guests can run: no\n";
        for p in &r.problems {
            s += &format!("  - {p}\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_host_without_kvm() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/module/kvm_amd")).unwrap();
        std::fs::write(
            dir.path().join("proc/cpuinfo"),
            "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9999\nflags\t\t: fpu svm lm\n",
        )
        .unwrap();
        let r = check(dir.path());
        assert_eq!(r.virt_extension, "svm");
        assert_eq!(r.kvm_module, "kvm_amd");
        assert_eq!(r.cpu_model, "AMD EPYC 9999");
        assert!(!r.ok());
        assert!(r.problems[0].contains("dev/kvm"), "{:?}", r.problems);
        assert!(format(&r).contains("Guests can run: no"));
    }
}
