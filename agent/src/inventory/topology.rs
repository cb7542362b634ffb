//! How a machine's GPUs are wired: which reach each other over NVLink, and which CPUs are close.

use std::collections::{BTreeMap, HashMap};

use super::driver::RawGpu;

/// For each GPU, the other GPUs it reaches over NVLink. NVML gives, per active link, the PCI
/// bus id at the far end: another GPU (an NVLink bridge) or an NVSwitch. GPUs joined by a link,
/// directly or through a shared switch, are peers: one connected component of the link graph.
pub fn nvlink_peers<'a>(gpus: impl Iterator<Item = &'a RawGpu>) -> HashMap<String, Vec<String>> {
    let gpus: Vec<&RawGpu> = gpus.collect();
    let mut sets = DisjointSets::default();
    for g in &gpus {
        let (Some(bus), Some(remotes)) = (&g.pci_bus_id, &g.nvlink_remotes) else { continue };
        for remote in remotes {
            sets.union(&normalize(bus), &normalize(remote));
        }
    }
    let mut by_root: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for g in &gpus {
        if let Some(bus) = &g.pci_bus_id
            && g.nvlink_remotes.as_ref().is_some_and(|r| !r.is_empty())
        {
            by_root.entry(sets.find(&normalize(bus))).or_default().push(&g.uuid);
        }
    }
    let mut peers = HashMap::new();
    for members in by_root.values() {
        for me in members {
            let others = members.iter().filter(|u| *u != me).map(|u| u.to_string()).collect();
            peers.insert(me.to_string(), others);
        }
    }
    peers
}

/// NVML writes bus ids with a 4- or 8-digit domain and either case.
fn normalize(bus_id: &str) -> String {
    let lower = bus_id.trim().to_lowercase();
    match lower.split_once(':') {
        Some((domain, rest)) => format!("{:0>8}:{rest}", domain.trim_start_matches('0')),
        None => lower,
    }
}

#[derive(Default)]
struct DisjointSets {
    parent: HashMap<String, String>,
}

impl DisjointSets {
    fn find(&mut self, x: &str) -> String {
        let mut root = x.to_string();
        while let Some(p) = self.parent.get(&root).filter(|p| **p != root) {
            root = p.clone();
        }
        self.parent.insert(x.to_string(), root.clone());
        root
    }

    fn union(&mut self, a: &str, b: &str) {
        let (ra, rb) = (self.find(a), self.find(b));
        // The smaller name becomes the root, so the result does not depend on the order.
        match ra.cmp(&rb) {
            std::cmp::Ordering::Less => self.parent.insert(rb, ra),
            std::cmp::Ordering::Greater => self.parent.insert(ra, rb),
            std::cmp::Ordering::Equal => None,
        };
    }
}

/// CPU numbers as the kernel writes a cpulist: "0-3,8,10-11".
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start { start.to_string() } else { format!("{start}-{}", sorted[i]) });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str, bus: &str, remotes: Option<&[&str]>) -> RawGpu {
        RawGpu {
            uuid: uuid.into(),
            pci_bus_id: Some(bus.into()),
            nvlink_remotes: remotes.map(|r| r.iter().map(|s| s.to_string()).collect()),
            ..RawGpu::default()
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn bridged_pairs_are_peers_of_each_other_only() {
        let gpus = [
            gpu("a", "00000000:01:00.0", Some(&["00000000:02:00.0", "00000000:02:00.0"])),
            gpu("b", "00000000:02:00.0", Some(&["0000:01:00.0"])),
            gpu("c", "00000000:03:00.0", Some(&["00000000:04:00.0"])),
            gpu("d", "00000000:04:00.0", Some(&["00000000:03:00.0"])),
            gpu("e", "00000000:05:00.0", None),
        ];
        let peers = nvlink_peers(gpus.iter());
        assert_eq!(peers["a"], vec!["b"]);
        assert_eq!(peers["b"], vec!["a"], "the domain's width and case do not matter");
        assert_eq!(peers["c"], vec!["d"]);
        assert!(!peers.contains_key("e"), "no NVLink, no peers");
    }

    #[test]
    fn gpus_on_one_nvswitch_fabric_are_all_peers() {
        let switch = ["00000000:c0:00.0", "00000000:c1:00.0"];
        let gpus: Vec<RawGpu> =
            (0..4).map(|i| gpu(&format!("g{i}"), &format!("00000000:0{i}:00.0"), Some(&switch[i % 2..]))).collect();
        let peers = nvlink_peers(gpus.iter());
        assert_eq!(sorted(peers["g1"].clone()), vec!["g0", "g2", "g3"]);
    }

    #[test]
    fn cpu_lists_use_ranges() {
        assert_eq!(cpu_list(&[3, 0, 1, 2, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[]), "");
    }
}
