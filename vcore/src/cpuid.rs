//! CPU models and CPUID normalisation.
//!
//! The table vmrun hands to `KVM_SET_CPUID2` starts from what KVM supports
//! (`KVM_GET_SUPPORTED_CPUID`), takes the vendor, family/model/stepping,
//! brand string and feature set of the chosen model (QEMU's definitions for
//! `qemu64` and `kvm64`), applies `+flag`/`-flag`, and is then fixed up per
//! vCPU: APIC IDs, topology leaves (1, 4, 0xB, 0x1F, 0x80000008,
//! 0x8000001E), the hypervisor bit and the KVM leaves with the TSC
//! frequency leaf 0x40000010.

use kvm_bindings::kvm_cpuid_entry2;

/// Errors from choosing a CPU model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// `-cpu NAME` with a name we do not know.
    #[error("unable to find CPU model '{0}'")]
    UnknownModel(String),
    /// `+flag` or `-flag` with an unknown flag name.
    #[error("property '{0}' not found")]
    UnknownFlag(String),
    /// A `-cpu` element that is neither `+flag`, `-flag` nor `flag=on|off`.
    #[error("invalid -cpu option '{0}'")]
    BadOption(String),
}

/// Register of a CPUID leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A named feature bit: leaf, subleaf, register, bit.
#[derive(Clone, Copy, Debug)]
pub struct Flag {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, reg: Reg, bit: u8) -> Flag {
    Flag {
        name,
        leaf,
        subleaf: 0,
        reg,
        bit,
    }
}

/// Feature flags accepted by `-cpu MODEL,+flag,-flag` (QEMU's names).
pub const FLAGS: &[Flag] = &[
    f("fpu", 1, Reg::Edx, 0),
    f("vme", 1, Reg::Edx, 1),
    f("de", 1, Reg::Edx, 2),
    f("pse", 1, Reg::Edx, 3),
    f("tsc", 1, Reg::Edx, 4),
    f("msr", 1, Reg::Edx, 5),
    f("pae", 1, Reg::Edx, 6),
    f("mce", 1, Reg::Edx, 7),
    f("cx8", 1, Reg::Edx, 8),
    f("apic", 1, Reg::Edx, 9),
    f("sep", 1, Reg::Edx, 11),
    f("mtrr", 1, Reg::Edx, 12),
    f("pge", 1, Reg::Edx, 13),
    f("mca", 1, Reg::Edx, 14),
    f("cmov", 1, Reg::Edx, 15),
    f("pat", 1, Reg::Edx, 16),
    f("pse36", 1, Reg::Edx, 17),
    f("clflush", 1, Reg::Edx, 19),
    f("mmx", 1, Reg::Edx, 23),
    f("fxsr", 1, Reg::Edx, 24),
    f("sse", 1, Reg::Edx, 25),
    f("sse2", 1, Reg::Edx, 26),
    f("ss", 1, Reg::Edx, 27),
    f("ht", 1, Reg::Edx, 28),
    f("pni", 1, Reg::Ecx, 0),
    f("sse3", 1, Reg::Ecx, 0),
    f("pclmulqdq", 1, Reg::Ecx, 1),
    f("monitor", 1, Reg::Ecx, 3),
    f("vmx", 1, Reg::Ecx, 5),
    f("ssse3", 1, Reg::Ecx, 9),
    f("fma", 1, Reg::Ecx, 12),
    f("cx16", 1, Reg::Ecx, 13),
    f("pdcm", 1, Reg::Ecx, 15),
    f("pcid", 1, Reg::Ecx, 17),
    f("sse4.1", 1, Reg::Ecx, 19),
    f("sse4.2", 1, Reg::Ecx, 20),
    f("x2apic", 1, Reg::Ecx, 21),
    f("movbe", 1, Reg::Ecx, 22),
    f("popcnt", 1, Reg::Ecx, 23),
    f("tsc-deadline", 1, Reg::Ecx, 24),
    f("aes", 1, Reg::Ecx, 25),
    f("xsave", 1, Reg::Ecx, 26),
    f("avx", 1, Reg::Ecx, 28),
    f("f16c", 1, Reg::Ecx, 29),
    f("rdrand", 1, Reg::Ecx, 30),
    f("hypervisor", 1, Reg::Ecx, 31),
    f("fsgsbase", 7, Reg::Ebx, 0),
    f("bmi1", 7, Reg::Ebx, 3),
    f("avx2", 7, Reg::Ebx, 5),
    f("smep", 7, Reg::Ebx, 7),
    f("bmi2", 7, Reg::Ebx, 8),
    f("erms", 7, Reg::Ebx, 9),
    f("invpcid", 7, Reg::Ebx, 10),
    f("avx512f", 7, Reg::Ebx, 16),
    f("rdseed", 7, Reg::Ebx, 18),
    f("adx", 7, Reg::Ebx, 19),
    f("smap", 7, Reg::Ebx, 20),
    f("clflushopt", 7, Reg::Ebx, 23),
    f("clwb", 7, Reg::Ebx, 24),
    f("sha-ni", 7, Reg::Ebx, 29),
    f("umip", 7, Reg::Ecx, 2),
    f("pku", 7, Reg::Ecx, 3),
    f("rdpid", 7, Reg::Ecx, 22),
    f("syscall", 0x8000_0001, Reg::Edx, 11),
    f("nx", 0x8000_0001, Reg::Edx, 20),
    f("pdpe1gb", 0x8000_0001, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, Reg::Edx, 27),
    f("lm", 0x8000_0001, Reg::Edx, 29),
    f("lahf-lm", 0x8000_0001, Reg::Ecx, 0),
    f("svm", 0x8000_0001, Reg::Ecx, 2),
    f("abm", 0x8000_0001, Reg::Ecx, 5),
    f("sse4a", 0x8000_0001, Reg::Ecx, 6),
];

/// Look a flag up by any of QEMU's spellings (`sse4.1`, `sse4_1`, `sse4-1`).
pub fn find_flag(name: &str) -> Option<&'static Flag> {
    let norm = |s: &str| s.replace(['_', '.'], "-");
    let want = norm(name);
    FLAGS.iter().find(|fl| norm(fl.name) == want)
}

/// Feature words a model defines: leaf 1 EDX/ECX, leaf 7 EBX/ECX, leaf
/// 0x80000001 EDX/ECX.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub l1_edx: u32,
    pub l1_ecx: u32,
    pub l7_ebx: u32,
    pub l7_ecx: u32,
    pub e1_edx: u32,
    pub e1_ecx: u32,
}

impl Features {
    fn word(&mut self, fl: &Flag) -> Option<&mut u32> {
        match (fl.leaf, fl.reg) {
            (1, Reg::Edx) => Some(&mut self.l1_edx),
            (1, Reg::Ecx) => Some(&mut self.l1_ecx),
            (7, Reg::Ebx) => Some(&mut self.l7_ebx),
            (7, Reg::Ecx) => Some(&mut self.l7_ecx),
            (0x8000_0001, Reg::Edx) => Some(&mut self.e1_edx),
            (0x8000_0001, Reg::Ecx) => Some(&mut self.e1_ecx),
            _ => None,
        }
    }

    /// Set or clear a flag.
    pub fn set(&mut self, fl: &Flag, on: bool) {
        if let Some(w) = self.word(fl) {
            if on {
                *w |= 1 << fl.bit;
            } else {
                *w &= !(1 << fl.bit);
            }
        }
    }
}

fn bits(names: &[&str]) -> u32 {
    names
        .iter()
        .filter_map(|n| find_flag(n))
        .fold(0, |acc, fl| acc | (1 << fl.bit))
}

/// A CPU model: what the guest is told it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuModel {
    /// `-cpu` name.
    pub name: String,
    /// Vendor string (12 bytes).
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    /// Brand string of leaves 0x80000002..4 (at most 48 bytes).
    pub brand: String,
    /// Features; `None` means "everything KVM supports" (`host`).
    pub features: Option<Features>,
    /// Highest basic leaf.
    pub level: u32,
    /// Highest extended leaf.
    pub xlevel: u32,
}

const PPRO: &[&str] = &[
    "fpu", "de", "pse", "tsc", "msr", "mce", "cx8", "pge", "cmov", "pat", "fxsr", "mmx", "sse",
    "sse2", "pae", "sep", "apic",
];

/// Models accepted by `-cpu`, with a description for `-cpu help`.
pub const MODELS: &[(&str, &str)] = &[
    ("host", "KVM processor with all supported host features"),
    ("qemu64", "QEMU Virtual CPU version 2.5+ (the default)"),
    ("kvm64", "Common KVM processor"),
    (
        "max",
        "Enables all features supported by the accelerator (same as host)",
    ),
];

impl CpuModel {
    /// The model called `name`; `host_brand`/`host_vendor` fill in `host`.
    pub fn by_name(name: &str, host_vendor: &str, host_brand: &str) -> Result<Self, CpuidError> {
        let l1_edx = bits(PPRO) | bits(&["mtrr", "clflush", "mca", "pse36"]);
        let common = Features {
            l1_edx,
            l1_ecx: bits(&["sse3", "cx16"]),
            e1_edx: bits(&["lm", "syscall", "nx"]),
            ..Features::default()
        };
        Ok(match name {
            "qemu64" => CpuModel {
                name: name.into(),
                vendor: "AuthenticAMD".into(),
                family: 15,
                model: 107,
                stepping: 1,
                brand: "QEMU Virtual CPU version 2.5+".into(),
                features: Some(Features {
                    e1_ecx: bits(&["lahf-lm", "svm"]),
                    ..common
                }),
                level: 0xd,
                xlevel: 0x8000_000a,
            },
            "kvm64" => CpuModel {
                name: name.into(),
                vendor: "GenuineIntel".into(),
                family: 15,
                model: 6,
                stepping: 1,
                brand: "Common KVM processor".into(),
                features: Some(Features {
                    l1_edx: l1_edx | bits(&["vme"]),
                    ..common
                }),
                level: 0xd,
                xlevel: 0x8000_0008,
            },
            "host" | "max" => CpuModel {
                name: name.into(),
                vendor: host_vendor.into(),
                family: 0,
                model: 0,
                stepping: 0,
                brand: host_brand.into(),
                features: None,
                level: u32::MAX,
                xlevel: u32::MAX,
            },
            other => return Err(CpuidError::UnknownModel(other.into())),
        })
    }
}

/// A parsed `-cpu` argument: a model and flag changes in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSpec {
    pub model: String,
    pub changes: Vec<(String, bool)>,
}

impl CpuSpec {
    /// Parse `MODEL[,+flag][,-flag][,flag=on|off]`.
    pub fn parse(s: &str) -> Result<Self, CpuidError> {
        let mut parts = s.split(',');
        let model = parts.next().unwrap_or_default().to_string();
        let mut changes = Vec::new();
        for p in parts.filter(|p| !p.is_empty()) {
            let (name, on) = if let Some(n) = p.strip_prefix('+') {
                (n, true)
            } else if let Some(n) = p.strip_prefix('-') {
                (n, false)
            } else if let Some((n, v)) = p.split_once('=') {
                match v {
                    "on" | "true" | "yes" => (n, true),
                    "off" | "false" | "no" => (n, false),
                    _ => return Err(CpuidError::BadOption(p.into())),
                }
            } else {
                (p, true)
            };
            if find_flag(name).is_none() {
                return Err(CpuidError::UnknownFlag(name.into()));
            }
            changes.push((name.to_string(), on));
        }
        Ok(CpuSpec { model, changes })
    }
}

/// Guest CPU topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

fn order(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

impl Topology {
    /// Bits of the APIC ID taken by the thread and core levels.
    pub fn shifts(&self) -> (u32, u32) {
        let t = order(self.threads);
        (t, t + order(self.cores))
    }

    /// APIC ID of vCPU `index` (sockets, then cores, then threads).
    pub fn apic_id(&self, index: u32) -> u32 {
        let (tshift, cshift) = self.shifts();
        let thread = index % self.threads;
        let core = (index / self.threads) % self.cores;
        let socket = index / (self.threads * self.cores);
        (socket << cshift) | (core << tshift) | thread
    }

    /// Logical CPUs per socket.
    pub fn per_socket(&self) -> u32 {
        self.cores * self.threads
    }
}

fn brand_words(brand: &str) -> [u32; 12] {
    let mut b = [0u8; 48];
    let n = brand.len().min(47);
    b[..n].copy_from_slice(&brand.as_bytes()[..n]);
    let mut w = [0u32; 12];
    for (i, c) in b.chunks(4).enumerate() {
        w[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    w
}

fn vendor_words(vendor: &str) -> (u32, u32, u32) {
    let mut v = [0u8; 12];
    let n = vendor.len().min(12);
    v[..n].copy_from_slice(&vendor.as_bytes()[..n]);
    let w = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    (w(0), w(4), w(8))
}

/// Decode a vendor string from leaf 0.
pub fn vendor_of(entries: &[kvm_cpuid_entry2]) -> String {
    let Some(e) = entries.iter().find(|e| e.function == 0) else {
        return String::new();
    };
    let mut s = Vec::new();
    for r in [e.ebx, e.edx, e.ecx] {
        s.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&s)
        .trim_end_matches('\0')
        .to_string()
}

/// Decode the brand string from leaves 0x80000002..4.
pub fn brand_of(entries: &[kvm_cpuid_entry2]) -> String {
    let mut s = Vec::new();
    for leaf in 0x8000_0002..=0x8000_0004u32 {
        if let Some(e) = entries.iter().find(|e| e.function == leaf) {
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                s.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    String::from_utf8_lossy(&s)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

/// Host vendor and brand, read with the CPUID instruction.
pub fn host_vendor_brand() -> (String, String) {
    use std::arch::x86_64::__cpuid;
    let mut entries = Vec::new();
    for leaf in [0u32, 0x8000_0002, 0x8000_0003, 0x8000_0004] {
        // CPUID is always available on x86_64 and has no side effects.
        let r = __cpuid(leaf);
        entries.push(kvm_cpuid_entry2 {
            function: leaf,
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
            ..Default::default()
        });
    }
    (vendor_of(&entries), brand_of(&entries))
}

fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        ..Default::default()
    }
}

fn set_entry(entries: &mut Vec<kvm_cpuid_entry2>, e: kvm_cpuid_entry2) {
    if let Some(x) = entries
        .iter_mut()
        .find(|x| x.function == e.function && x.index == e.index)
    {
        *x = e;
    } else {
        entries.push(e);
    }
}

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Build the CPUID table for one model from KVM's supported table; the
/// result is the same for every vCPU until [`for_vcpu`] patches it.
pub fn model_table(
    supported: &[kvm_cpuid_entry2],
    model: &CpuModel,
    changes: &[(String, bool)],
    tsc_khz: Option<u32>,
) -> Vec<kvm_cpuid_entry2> {
    let mut t: Vec<kvm_cpuid_entry2> = supported.to_vec();
    let get = |t: &Vec<kvm_cpuid_entry2>, f: u32, i: u32| {
        t.iter()
            .find(|e| e.function == f && e.index == i)
            .copied()
            .unwrap_or(entry(f, i))
    };
    let sup = |f: u32, i: u32, r: Reg| {
        let e = supported
            .iter()
            .find(|e| e.function == f && e.index == i)
            .copied();
        e.map(|e| match r {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        })
        .unwrap_or(0)
    };

    // Features: the model's (or everything supported for host), then the
    // user's changes, masked by what KVM supports.
    let mut feat = model.features.unwrap_or(Features {
        l1_edx: sup(1, 0, Reg::Edx),
        l1_ecx: sup(1, 0, Reg::Ecx),
        l7_ebx: sup(7, 0, Reg::Ebx),
        l7_ecx: sup(7, 0, Reg::Ecx),
        e1_edx: sup(0x8000_0001, 0, Reg::Edx),
        e1_ecx: sup(0x8000_0001, 0, Reg::Ecx),
    });
    if model.features.is_some() {
        // QEMU adds these with KVM: x2APIC and the TSC deadline timer
        // where the in-kernel LAPIC provides them.
        feat.l1_ecx |= sup(1, 0, Reg::Ecx) & bits(&["x2apic", "tsc-deadline"]);
    }
    for (name, on) in changes {
        if let Some(fl) = find_flag(name) {
            feat.set(fl, *on);
        }
    }
    // KVM always reports the hypervisor bit as supportable; guests need it.
    feat.l1_ecx |= 1 << 31;
    // Never expose performance-monitoring capabilities we do not emulate.
    feat.l1_ecx &= !(1 << 15);

    let max_basic = sup(0, 0, Reg::Eax).min(model.level);
    let max_ext = sup(0x8000_0000, 0, Reg::Eax)
        .max(0x8000_0004)
        .min(model.xlevel);
    t.retain(|e| {
        (e.function <= max_basic)
            || (0x4000_0000..0x5000_0000).contains(&e.function)
            || (0x8000_0000..=max_ext).contains(&e.function)
    });

    let (v0, v1, v2) = vendor_words(&model.vendor);
    let mut l0 = get(&t, 0, 0);
    l0.eax = max_basic;
    l0.ebx = v0;
    l0.edx = v1;
    l0.ecx = v2;
    set_entry(&mut t, l0);

    let mut l1 = get(&t, 1, 0);
    if model.features.is_some() {
        let (fam, ext_fam) = if model.family > 0xf {
            (0xf, model.family - 0xf)
        } else {
            (model.family, 0)
        };
        l1.eax = (model.stepping & 0xf)
            | ((model.model & 0xf) << 4)
            | ((fam & 0xf) << 8)
            | (((model.model >> 4) & 0xf) << 16)
            | ((ext_fam & 0xff) << 20);
    }
    l1.ecx = feat.l1_ecx & (sup(1, 0, Reg::Ecx) | (1 << 31));
    l1.edx = feat.l1_edx & sup(1, 0, Reg::Edx);
    set_entry(&mut t, l1);

    if max_basic >= 7 {
        let mut l7 = get(&t, 7, 0);
        l7.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        l7.ebx = feat.l7_ebx & sup(7, 0, Reg::Ebx);
        l7.ecx = feat.l7_ecx & sup(7, 0, Reg::Ecx);
        if model.features.is_some() {
            l7.edx = 0;
        }
        set_entry(&mut t, l7);
    }
    // No architectural performance monitoring.
    if let Some(e) = t.iter_mut().find(|e| e.function == 0xa) {
        e.eax = 0;
        e.ebx = 0;
        e.ecx = 0;
        e.edx = 0;
    }

    let mut e0 = get(&t, 0x8000_0000, 0);
    e0.eax = max_ext;
    if model.features.is_some() {
        e0.ebx = v0;
        e0.edx = v1;
        e0.ecx = v2;
    }
    set_entry(&mut t, e0);
    let mut e1 = get(&t, 0x8000_0001, 0);
    if model.features.is_some() {
        e1.eax = l1.eax;
    }
    e1.ecx = feat.e1_ecx & sup(0x8000_0001, 0, Reg::Ecx);
    e1.edx = feat.e1_edx & sup(0x8000_0001, 0, Reg::Edx);
    set_entry(&mut t, e1);
    let bw = brand_words(&model.brand);
    for (i, leaf) in (0x8000_0002..=0x8000_0004u32).enumerate() {
        let mut e = get(&t, leaf, 0);
        e.eax = bw[i * 4];
        e.ebx = bw[i * 4 + 1];
        e.ecx = bw[i * 4 + 2];
        e.edx = bw[i * 4 + 3];
        set_entry(&mut t, e);
    }

    // KVM leaves: signature, features, and the TSC frequency leaf.
    let kvm_features = sup(0x4000_0001, 0, Reg::Eax);
    let mut k0 = entry(0x4000_0000, 0);
    let (s0, s1, s2) = vendor_words("KVMKVMKVM\0\0\0");
    k0.ebx = s0;
    k0.ecx = s1;
    k0.edx = s2;
    k0.eax = if tsc_khz.is_some() {
        0x4000_0010
    } else {
        0x4000_0001
    };
    set_entry(&mut t, k0);
    let mut k1 = get(&t, 0x4000_0001, 0);
    k1.eax = kvm_features;
    set_entry(&mut t, k1);
    if let Some(khz) = tsc_khz {
        let mut k10 = entry(0x4000_0010, 0);
        k10.eax = khz;
        k10.ebx = 1_000_000; // APIC bus frequency in kHz (1 GHz)
        set_entry(&mut t, k10);
    }
    t
}

/// Patch a model table for vCPU `index` in `topo`.
pub fn for_vcpu(table: &[kvm_cpuid_entry2], index: u32, topo: Topology) -> Vec<kvm_cpuid_entry2> {
    let mut t = table.to_vec();
    let apic = topo.apic_id(index);
    let per_socket = topo.per_socket();
    let (tshift, cshift) = topo.shifts();
    for e in t.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (apic << 24) | ((per_socket & 0xff) << 16) | (8 << 8);
                if per_socket > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical CPU per package
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            // Deterministic cache parameters (Intel): cores per package
            // and threads sharing each cache level.
            4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { per_socket } else { topo.threads };
                e.eax = (e.eax & 0x3fff)
                    | (((sharing.max(1) - 1) & 0xfff) << 14)
                    | (((topo.cores.max(1) - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                e.edx = apic;
                match e.index {
                    0 => {
                        e.eax = tshift;
                        e.ebx = topo.threads;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = cshift;
                        e.ebx = per_socket;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of logical CPUs per package minus one, and
                // the APIC ID size.
                e.ecx = (per_socket.max(1) - 1) & 0xff | (cshift << 12);
            }
            0x8000_001e => {
                e.eax = apic;
                e.ebx = (apic >> tshift) & 0xff | ((topo.threads.max(1) - 1) << 8);
                e.ecx = apic >> cshift;
            }
            _ => {}
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> Vec<kvm_cpuid_entry2> {
        let mut v = vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x10,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0xffff_ffff,
                edx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 0xffff_ffff,
                ecx: 0xffff_ffff,
                edx: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0000,
                eax: 0x8000_0021,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0001,
                ecx: 0xffff_ffff,
                edx: 0xffff_ffff,
                ..Default::default()
            },
        ];
        v.push(kvm_cpuid_entry2 {
            function: 0x8000_0008,
            eax: 0x3030,
            ..Default::default()
        });
        v
    }

    #[test]
    fn qemu64_identity_and_features() {
        let m = CpuModel::by_name("qemu64", "GenuineIntel", "x").unwrap();
        let t = model_table(&supported(), &m, &[], Some(2_000_000));
        assert_eq!(vendor_of(&t), "AuthenticAMD");
        assert_eq!(brand_of(&t), "QEMU Virtual CPU version 2.5+");
        let l1 = t.iter().find(|e| e.function == 1).unwrap();
        // family 0xf, model 0x6b, stepping 1 → ext model 6, model b.
        assert_eq!(l1.eax, 0x0006_0fb1);
        assert_eq!(l1.ecx & (1 << 31), 1 << 31, "hypervisor bit");
        assert_eq!(l1.ecx & (1 << 23), 0, "no popcnt in qemu64");
        assert_ne!(l1.ecx & (1 << 13), 0, "cx16 in qemu64");
        let l0 = t.iter().find(|e| e.function == 0).unwrap();
        assert_eq!(l0.eax, 0xd);
        let e0 = t.iter().find(|e| e.function == 0x8000_0000).unwrap();
        assert_eq!(e0.eax, 0x8000_000a);
        assert!(t.iter().all(|e| e.function != 0x8000_0021));
        let k = t.iter().find(|e| e.function == 0x4000_0010).unwrap();
        assert_eq!(k.eax, 2_000_000);
    }

    #[test]
    fn flags_are_applied_and_masked() {
        let m = CpuModel::by_name("kvm64", "", "").unwrap();
        let changes = CpuSpec::parse("kvm64,+popcnt,-cx16,sse4_1=on")
            .unwrap()
            .changes;
        let mut sup = supported();
        sup[1].ecx &= !(1 << 19); // host lacks sse4.1
        let t = model_table(&sup, &m, &changes, None);
        let l1 = t.iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & (1 << 23), 0);
        assert_eq!(l1.ecx & (1 << 13), 0);
        assert_eq!(l1.ecx & (1 << 19), 0, "masked by KVM's support");
        assert_eq!(vendor_of(&t), "GenuineIntel");
        assert!(t.iter().all(|e| e.function != 0x4000_0010));
    }

    #[test]
    fn spec_errors() {
        assert_eq!(
            CpuSpec::parse("qemu64,+bogus"),
            Err(CpuidError::UnknownFlag("bogus".into()))
        );
        assert_eq!(
            CpuSpec::parse("qemu64,avx=maybe"),
            Err(CpuidError::BadOption("avx=maybe".into()))
        );
        assert_eq!(
            CpuModel::by_name("pentium9", "", ""),
            Err(CpuidError::UnknownModel("pentium9".into()))
        );
    }

    #[test]
    fn topology_and_per_vcpu_leaves() {
        let topo = Topology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        assert_eq!(topo.shifts(), (1, 3));
        let ids: Vec<u32> = (0..12).map(|i| topo.apic_id(i)).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        let m = CpuModel::by_name("qemu64", "", "").unwrap();
        let t = model_table(&supported(), &m, &[], None);
        let v = for_vcpu(&t, 7, topo);
        let l1 = v.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 9);
        assert_eq!((l1.ebx >> 16) & 0xff, 6);
        assert_ne!(l1.edx & (1 << 28), 0);
        let b1 = v
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
            .unwrap();
        assert_eq!((b1.eax, b1.ebx, b1.edx), (3, 6, 9));
        let single = for_vcpu(
            &t,
            0,
            Topology {
                sockets: 1,
                cores: 1,
                threads: 1,
            },
        );
        assert_eq!(
            single.iter().find(|e| e.function == 1).unwrap().edx & (1 << 28),
            0
        );
    }
}
