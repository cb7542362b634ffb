//! Which GPUs of a node a rank gets. GPUs that talk over NVLink, or sit under one NUMA node,
//! exchange gradients faster than GPUs that cross the CPU interconnect, so a rank's GPUs come
//! from as few such groups as possible; and, as between nodes, best fit: the smallest group
//! that holds the rank, so larger groups stay whole for larger jobs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use super::Gpu;

/// A GPU's group at one level of the topology; `None` where the inventory does not say.
pub(crate) type Level<'a> = &'a dyn Fn(usize) -> Option<u32>;

/// Per GPU of a node, its NVLink domain: the connected component of the peer graph. `None` for
/// a GPU without peers.
pub(crate) fn nvlink_domains(gpus: &[Gpu]) -> Vec<Option<u32>> {
    if gpus.iter().all(|g| g.nvlink_peers.is_empty()) {
        return vec![None; gpus.len()];
    }
    let index: HashMap<&str, usize> = gpus.iter().enumerate().map(|(i, g)| (g.uuid.as_str(), i)).collect();
    let mut domain: Vec<Option<u32>> = vec![None; gpus.len()];
    let mut next = 0;
    for start in 0..gpus.len() {
        if domain[start].is_some() || gpus[start].nvlink_peers.is_empty() {
            continue;
        }
        let mut stack = vec![start];
        domain[start] = Some(next);
        while let Some(g) = stack.pop() {
            for peer in gpus[g].nvlink_peers.iter().filter_map(|u| index.get(u.as_str())) {
                if domain[*peer].is_none() {
                    domain[*peer] = Some(next);
                    stack.push(*peer);
                }
            }
        }
        next += 1;
    }
    domain
}

/// Chooses `want` of `candidates` (GPU indices, ascending), level by level (NVLink domain, then
/// NUMA node): the smallest group that holds what is left; if none does, the largest groups
/// whole, then again. A level nobody reports is skipped.
pub(crate) fn pick(candidates: &[usize], want: usize, levels: &[Level]) -> Vec<usize> {
    if candidates.len() <= want {
        return candidates.to_vec();
    }
    let Some((level, rest)) = levels.split_first() else { return candidates[..want].to_vec() };
    let mut keyed: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &g in candidates {
        match level(g) {
            Some(key) => keyed.entry(key).or_default().push(g),
            None => groups.push(vec![g]),
        }
    }
    if keyed.is_empty() {
        return pick(candidates, want, rest);
    }
    groups.extend(keyed.into_values());
    let mut picked = Vec::with_capacity(want);
    let mut left = want;
    while left > 0 {
        let fits = (0..groups.len()).filter(|&i| groups[i].len() >= left);
        if let Some(i) = fits.min_by_key(|&i| (groups[i].len(), groups[i][0])) {
            picked.extend(pick(&groups[i], left, rest));
            break;
        }
        // Candidates outnumber `want`, so some group remains while anything is left.
        let i = (0..groups.len()).max_by_key(|&i| (groups[i].len(), Reverse(groups[i][0]))).expect("a group left");
        let group = groups.swap_remove(i);
        left -= group.len();
        picked.extend(group);
    }
    picked.sort_unstable();
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(peers: &[&[usize]], numa: &[Option<u32>]) -> Vec<Gpu> {
        (0..numa.len())
            .map(|i| Gpu {
                uuid: format!("g{i}"),
                nvlink_peers: peers.get(i).map_or(Vec::new(), |p| p.iter().map(|j| format!("g{j}")).collect()),
                numa_node: numa[i],
                healthy: true,
                ..Gpu::default()
            })
            .collect()
    }

    fn choose(node: &[Gpu], free: &[usize], want: usize) -> Vec<usize> {
        let domains = nvlink_domains(node);
        let nvlink = |g: usize| domains[g];
        let numa = |g: usize| node[g].numa_node;
        pick(free, want, &[&nvlink, &numa])
    }

    #[test]
    fn without_topology_the_first_free_gpus_are_taken() {
        let node = gpus(&[], &[None; 4]);
        assert_eq!(choose(&node, &[0, 1, 2, 3], 2), vec![0, 1]);
    }

    #[test]
    fn a_pair_goes_to_a_whole_nvlink_bridge_rather_than_splitting_two() {
        // Bridged pairs (0,1) and (2,3); GPU 1 is taken.
        let node = gpus(&[&[1], &[0], &[3], &[2]], &[None; 4]);
        assert_eq!(choose(&node, &[0, 2, 3], 2), vec![2, 3]);
        // And a single GPU goes to the broken pair, keeping the whole one whole.
        assert_eq!(choose(&node, &[0, 2, 3], 1), vec![0]);
    }

    #[test]
    fn a_rank_stays_on_one_numa_node_and_picks_the_fuller_one() {
        let numa = [Some(0), Some(0), Some(0), Some(0), Some(1), Some(1), Some(1), Some(1)];
        let node = gpus(&[], &numa);
        // NUMA 0 has 2 free, NUMA 1 has 4: a 2-GPU rank takes NUMA 0's, leaving 4 together.
        assert_eq!(choose(&node, &[2, 3, 4, 5, 6, 7], 2), vec![2, 3]);
        // A 4-GPU rank fits only NUMA 1 whole.
        assert_eq!(choose(&node, &[2, 3, 4, 5, 6, 7], 4), vec![4, 5, 6, 7]);
        // Six must span both: all of the larger group first.
        assert_eq!(choose(&node, &[1, 2, 3, 4, 5, 6, 7], 6), vec![1, 2, 4, 5, 6, 7]);
    }

    #[test]
    fn nvlink_domains_are_connected_components() {
        let node = gpus(&[&[1], &[0, 2], &[1], &[]], &[None; 4]);
        assert_eq!(nvlink_domains(&node), vec![Some(0), Some(0), Some(0), None]);
    }

    #[test]
    fn within_an_nvswitch_domain_numa_decides() {
        let all: Vec<usize> = (0..8).collect();
        let peers: Vec<Vec<usize>> = (0..8).map(|i| all.iter().copied().filter(|j| *j != i).collect()).collect();
        let peer_refs: Vec<&[usize]> = peers.iter().map(|p| p.as_slice()).collect();
        let numa: Vec<Option<u32>> = (0..8).map(|i| Some(i / 4)).collect();
        let node = gpus(&peer_refs, &numa);
        assert_eq!(choose(&node, &[3, 4, 5, 6, 7], 4), vec![4, 5, 6, 7]);
        assert_eq!(choose(&node, &[3, 4, 5, 6, 7], 1), vec![3]);
    }
}
