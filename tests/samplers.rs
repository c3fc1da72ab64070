//! Samplers against the `samplers` entry of `seed_extra.json` (PyTorch's index layouts and error
//! texts), plus seeded property tests of the random samplers.

mod common;

use std::sync::Arc;

use serde_json::Value;
use tracegrad::data::{
    BatchSampler, DataError, DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler,
    SubsetRandomSampler, WeightedRandomSampler,
};
use tracegrad::Generator;

fn indices(v: &Value) -> Vec<usize> {
    v.as_array().expect("a list of indices").iter().map(|i| i.as_u64().expect("an index") as usize).collect()
}

fn nested(v: &Value) -> Vec<Vec<usize>> {
    v.as_array().expect("a list of lists").iter().map(indices).collect()
}

fn err_text<T: std::fmt::Debug>(r: Result<T, DataError>) -> String {
    r.expect_err("expected an error").to_string()
}

/// Every key of the `samplers` entry, each checked by the test below that names it.
const COVERED: [&str; 9] = [
    "sequential_5",
    "batch_seq_10_4",
    "batch_seq_10_4_drop_last",
    "distributed_10_over_3_shuffle_false_drop_last_False",
    "distributed_10_over_3_shuffle_false_drop_last_True",
    "distributed_len_10_over_4",
    "distributed_error_rank_2",
    "distributed_error_rank_-1",
    "subset_random_is_permutation_of",
];

#[test]
fn every_reference_key_is_covered() {
    let r = common::reference("seed_extra.json");
    let mut keys: Vec<&str> = r["samplers"].as_object().expect("samplers").keys().map(String::as_str).collect();
    keys.sort();
    let mut covered = COVERED.to_vec();
    covered.sort();
    assert_eq!(keys, covered);
}

#[test]
fn sequential_and_batch_match_reference() {
    let r = &common::reference("seed_extra.json")["samplers"];
    let s = SequentialSampler::new(5);
    assert_eq!(s.iter().collect::<Vec<_>>(), indices(&r["sequential_5"]));
    assert_eq!(s.len(), 5);

    for (key, drop_last) in [("batch_seq_10_4", false), ("batch_seq_10_4_drop_last", true)] {
        let want = nested(&r[key]);
        let b = BatchSampler::new(SequentialSampler::new(10), 4, drop_last).unwrap();
        assert_eq!(b.iter().collect::<Vec<_>>(), want, "{key}");
        assert_eq!(b.len(), want.len(), "{key}: len");
    }
}

#[test]
fn distributed_layouts_match_reference() {
    let r = &common::reference("seed_extra.json")["samplers"];
    for (key, drop_last) in [
        ("distributed_10_over_3_shuffle_false_drop_last_False", false),
        ("distributed_10_over_3_shuffle_false_drop_last_True", true),
    ] {
        let want = nested(&r[key]);
        let got: Vec<Vec<usize>> = (0..3)
            .map(|rank| {
                let s = DistributedSampler::new(10, 3, rank).unwrap().shuffle(false).drop_last(drop_last);
                let idx: Vec<usize> = s.iter().collect();
                assert_eq!(s.len(), idx.len(), "{key}: len of rank {rank}");
                assert_eq!(s.total_size(), 3 * idx.len());
                idx
            })
            .collect();
        assert_eq!(got, want, "{key}");
    }
    let want_len = r["distributed_len_10_over_4"].as_u64().unwrap() as usize;
    for rank in 0..4 {
        let s = DistributedSampler::new(10, 4, rank).unwrap();
        assert_eq!(s.len(), want_len);
        assert_eq!(s.iter().count(), want_len);
    }
}

#[test]
fn distributed_errors_match_reference() {
    let r = &common::reference("seed_extra.json")["samplers"];
    assert_eq!(err_text(DistributedSampler::new(10, 2, 2)), r["distributed_error_rank_2"].as_str().unwrap());
    assert_eq!(err_text(DistributedSampler::new(10, 2, -1)), r["distributed_error_rank_-1"].as_str().unwrap());
    // No replicas: every rank is invalid, in PyTorch's words.
    assert_eq!(err_text(DistributedSampler::new(10, 0, 0)), "Invalid rank 0, rank should be in the interval [0, -1]");
}

#[test]
fn subset_random_is_a_permutation_of_the_subset() {
    let r = &common::reference("seed_extra.json")["samplers"];
    let subset = indices(&r["subset_random_is_permutation_of"]);
    for seed in 0..20 {
        let s = SubsetRandomSampler::with_seed(subset.clone(), seed);
        let mut got: Vec<usize> = s.iter().collect();
        got.sort();
        assert_eq!(got, subset, "seed {seed}");
        assert_eq!(s.len(), subset.len());
    }
    // Over a few seeds, the order is not always the given one.
    assert!(
        (0..20).any(|seed| SubsetRandomSampler::with_seed(subset.clone(), seed).iter().collect::<Vec<_>>() != subset)
    );
}

#[test]
fn random_sampler_without_replacement_is_a_permutation() {
    for (seed, n) in [(0u64, 1usize), (1, 2), (2, 7), (3, 100), (4, 1000)] {
        let s = RandomSampler::with_seed(n, seed).unwrap();
        let mut first = Vec::new();
        for epoch in 0..3 {
            let idx: Vec<usize> = s.iter().collect();
            let mut sorted = idx.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "seed {seed}, n {n}, epoch {epoch}");
            if epoch == 0 {
                first = idx;
            }
        }
        // The same seed replays the same epochs.
        assert_eq!(RandomSampler::with_seed(n, seed).unwrap().iter().collect::<Vec<_>>(), first);
    }
    // num_samples beyond n chains permutations; with replacement, uniform draws in range.
    let s = RandomSampler::with_options(4, false, Some(10), Some(Generator::new(5))).unwrap();
    let idx: Vec<usize> = s.iter().collect();
    assert_eq!(idx.len(), 10);
    for chunk in idx.chunks(4).take(2) {
        let mut c = chunk.to_vec();
        c.sort();
        assert_eq!(c, vec![0, 1, 2, 3]);
    }
    let s = RandomSampler::with_options(3, true, Some(50), Some(Generator::new(6))).unwrap();
    let idx: Vec<usize> = s.iter().collect();
    assert_eq!((s.len(), idx.len()), (50, 50));
    assert!(idx.iter().all(|&i| i < 3));
    assert!(s.replacement());
    assert_eq!(
        err_text(RandomSampler::with_options(3, true, Some(0), None)),
        "num_samples should be a positive integer value, but got num_samples=0"
    );
}

/// Pearson's chi-square statistic of `counts` against probabilities `p`.
fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts.iter().zip(p).map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p)).sum()
}

#[test]
fn weighted_random_sampler_counts_follow_the_weights() {
    let weights = vec![1.0, 2.0, 3.0, 4.0, 0.0, 10.0];
    let total: f64 = weights.iter().sum();
    let s = WeightedRandomSampler::with_seed(weights.clone(), 20_000, true, 1234).unwrap();
    assert_eq!(s.len(), 20_000);
    let mut counts = vec![0usize; weights.len()];
    for i in s.iter() {
        counts[i] += 1;
    }
    assert_eq!(counts[4], 0, "a zero weight is never drawn");
    let nz: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
    let c: Vec<usize> = nz.iter().map(|&i| counts[i]).collect();
    let p: Vec<f64> = nz.iter().map(|&i| weights[i] / total).collect();
    // 4 degrees of freedom: P(chi² > 18.467) = 0.001.
    let stat = chi_square(&c, &p);
    assert!(stat < 18.467, "chi-square {stat} for counts {counts:?}");

    // A new epoch is a new draw; the same seed replays it.
    let e1: Vec<usize> = s.iter().collect();
    assert_ne!(e1, s.iter().collect::<Vec<_>>());
    let again = WeightedRandomSampler::with_seed(weights.clone(), 20_000, true, 1234).unwrap();
    let _ = again.iter();
    assert_eq!(again.iter().collect::<Vec<_>>(), e1);
}

#[test]
fn weighted_random_sampler_without_replacement() {
    let weights = vec![5.0, 0.0, 1.0, 2.0, 0.0];
    for seed in 0..50 {
        let s = WeightedRandomSampler::with_seed(weights.clone(), 5, false, seed).unwrap();
        let idx: Vec<usize> = s.iter().collect();
        let mut sorted = idx.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4], "distinct indices, seed {seed}");
        // Positive weights first, then the zero weights in index order (multinomial's topk).
        assert_eq!(&idx[3..], &[1, 4], "seed {seed}");
    }
    // The heaviest index comes first most often: P(first = 0) = 5/8.
    let firsts = (0..2000)
        .filter(|&seed| {
            WeightedRandomSampler::with_seed(weights.clone(), 1, false, seed).unwrap().iter().next() == Some(0)
        })
        .count();
    let p = firsts as f64 / 2000.0;
    assert!((p - 0.625).abs() < 0.05, "P(first = 0) = {p}");
}

#[test]
fn weighted_random_sampler_errors_have_pytorchs_texts() {
    assert_eq!(
        err_text(WeightedRandomSampler::new(vec![1.0, 2.0], 0, true)),
        "num_samples should be a positive integer value, but got num_samples=0"
    );
    assert_eq!(
        err_text(WeightedRandomSampler::new(vec![1.0, 2.0], 3, false)),
        "cannot sample n_sample > prob_dist.size(-1) samples without replacement"
    );
    for bad in [-1.0, f64::INFINITY, f64::NAN] {
        assert_eq!(
            err_text(WeightedRandomSampler::new(vec![1.0, bad], 2, true)),
            "probability tensor contains either `inf`, `nan` or element < 0"
        );
    }
    assert_eq!(
        err_text(WeightedRandomSampler::new(vec![0.0, 0.0], 2, true)),
        "invalid multinomial distribution (sum of probabilities <= 0)"
    );
    assert_eq!(
        err_text(WeightedRandomSampler::new(vec![], 1, true)),
        "invalid multinomial distribution (sum of probabilities <= 0)"
    );
}

/// The union over ranks, as a multiset, of one epoch.
fn all_ranks(
    n: usize,
    replicas: usize,
    configure: impl Fn(DistributedSampler) -> DistributedSampler,
) -> Vec<Vec<usize>> {
    (0..replicas).map(|r| configure(DistributedSampler::new(n, replicas, r as i64).unwrap()).iter().collect()).collect()
}

#[test]
fn distributed_shuffle_is_shared_by_ranks_and_moves_with_the_epoch() {
    let (n, replicas) = (23usize, 4usize);
    for seed in [0u64, 7] {
        let epoch0 = all_ranks(n, replicas, |s| s.seed(seed));
        // Rank r holds positions r, r + R, … of one permutation (padded from its start): rebuild it.
        let total = epoch0[0].len() * replicas;
        let mut perm = vec![usize::MAX; total];
        for (r, idx) in epoch0.iter().enumerate() {
            assert_eq!(idx.len(), n.div_ceil(replicas));
            for (k, &i) in idx.iter().enumerate() {
                perm[k * replicas + r] = i;
            }
        }
        let mut head = perm[..n].to_vec();
        head.sort();
        assert_eq!(head, (0..n).collect::<Vec<_>>(), "the ranks together see a permutation of the data set");
        assert_eq!(&perm[n..], &perm[..total - n], "padding repeats the permutation's start");

        // Same (seed, epoch): same layout, whichever sampler object computes it.
        assert_eq!(all_ranks(n, replicas, |s| s.seed(seed)), epoch0);
        // set_epoch changes the permutation, the same way on every rank.
        let samplers: Vec<Arc<DistributedSampler>> = (0..replicas)
            .map(|r| Arc::new(DistributedSampler::new(n, replicas, r as i64).unwrap().seed(seed)))
            .collect();
        for s in &samplers {
            s.set_epoch(1);
            assert_eq!(s.epoch(), 1);
        }
        let epoch1: Vec<Vec<usize>> = samplers.iter().map(|s| s.iter().collect()).collect();
        assert_ne!(epoch1, epoch0, "seed {seed}: a new epoch is a new order");
        assert_eq!(
            epoch1,
            all_ranks(n, replicas, |s| {
                s.set_epoch(1);
                s.seed(seed)
            })
        );
        // Epoch e with seed s is seed s + e at epoch 0 (PyTorch seeds with seed + epoch).
        assert_eq!(epoch1, all_ranks(n, replicas, |s| s.seed(seed + 1)));
    }
    // Different seeds, different orders.
    assert_ne!(all_ranks(n, replicas, |s| s.seed(0)), all_ranks(n, replicas, |s| s.seed(1)));
}

#[test]
fn distributed_padding_and_drop_last() {
    for n in 0..30usize {
        for replicas in 1..6usize {
            // Without drop_last: ⌈n/R⌉ each, the ranks cover every index, padding from the start.
            let ranks = all_ranks(n, replicas, |s| s.shuffle(false));
            let per = n.div_ceil(replicas);
            assert!(ranks.iter().all(|r| r.len() == per), "n {n}, R {replicas}");
            let mut flat: Vec<usize> = (0..per * replicas).map(|k| ranks[k % replicas][k / replicas]).collect();
            let padding = flat.split_off(n);
            assert_eq!(flat, (0..n).collect::<Vec<_>>());
            assert_eq!(padding, (0..padding.len()).map(|k| k % n.max(1)).collect::<Vec<_>>());

            // With drop_last: ⌊n/R⌋ each, distinct, the tail cut.
            let ranks = all_ranks(n, replicas, |s| s.shuffle(false).drop_last(true));
            let per = n / replicas;
            assert!(ranks.iter().all(|r| r.len() == per));
            let mut all: Vec<usize> = ranks.concat();
            all.sort();
            assert_eq!(all, (0..per * replicas).collect::<Vec<_>>());

            // Shuffled and dropping the tail: distinct indices across ranks.
            let ranks = all_ranks(n, replicas, |s| s.seed(3).drop_last(true));
            let mut all: Vec<usize> = ranks.concat();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), per * replicas);
        }
    }
    // More padding than data: indices repeat cyclically (PyTorch's `indices * ceil(...)` branch).
    let ranks = all_ranks(2, 5, |s| s.shuffle(false));
    assert_eq!(ranks, vec![vec![0], vec![1], vec![0], vec![1], vec![0]]);
}

#[test]
fn distributed_sampler_drives_a_data_loader() {
    let sampler = Arc::new(DistributedSampler::new(10, 2, 1).unwrap().seed(11));
    let loader =
        DataLoader::builder((0..10i64).collect::<Vec<_>>()).batch_size(2).sampler(sampler.clone()).build().unwrap();
    assert_eq!(loader.len(), 3);
    let epoch = |l: &DataLoader<Vec<i64>>| -> Vec<i64> { l.iter().flat_map(|b| b.unwrap().to_vec::<i64>()).collect() };
    let e0 = epoch(&loader);
    let want: Vec<i64> = sampler.iter().map(|i| i as i64).collect();
    assert_eq!(e0, want);
    assert_eq!(epoch(&loader), e0, "without set_epoch every epoch repeats");
    sampler.set_epoch(1);
    assert_ne!(epoch(&loader), e0);
}
