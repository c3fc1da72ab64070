//! `tracegrad::data`: samplers, `TensorDataset` and `DataLoader` against PyTorch's semantics and
//! the reference transcript `dataloader.json`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracegrad::data::{
    self, BatchSampler, DataError, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset,
    SubsetRandomSampler, TensorDataset,
};
use tracegrad::Tensor;

fn reference() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference/dataloader.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("dataloader.json parses")
}

fn index_batches(v: &serde_json::Value) -> Vec<Vec<usize>> {
    v.as_array()
        .expect("a list of batches")
        .iter()
        .map(|b| b.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect())
        .collect()
}

/// The integer batches a loader over `Vec<i64>` yields in one epoch.
fn epoch_i64<C>(loader: &DataLoader<Vec<i64>, C>) -> Vec<Vec<i64>>
where
    C: tracegrad::data::Collate<i64, Output = Tensor> + 'static,
{
    loader.iter().map(|b| b.unwrap().to_vec::<i64>()).collect()
}

fn err_text<T>(r: Result<T, DataError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn batch_sampler_matches_reference() {
    let r = reference();
    for (key, drop_last) in [("batch_sampler_10_3", false), ("batch_sampler_10_3_drop_last", true)] {
        let want = index_batches(&r[key]);
        let bs = BatchSampler::new(SequentialSampler::new(10), 3, drop_last).unwrap();
        assert_eq!(bs.iter().collect::<Vec<_>>(), want, "{key}");
        assert_eq!(bs.len(), want.len(), "{key} len");

        // The same layout through a DataLoader over 0..10, collated to i64 tensors.
        let loader =
            DataLoader::builder((0..10i64).collect::<Vec<_>>()).batch_size(3).drop_last(drop_last).build().unwrap();
        assert_eq!(loader.len(), want.len());
        let got = epoch_i64(&loader);
        let want_i64: Vec<Vec<i64>> = want.iter().map(|b| b.iter().map(|&i| i as i64).collect()).collect();
        assert_eq!(got, want_i64, "{key} via DataLoader");

        // And as an explicit batch_sampler.
        let loader = DataLoader::builder((0..10i64).collect::<Vec<_>>())
            .batch_sampler(BatchSampler::new(SequentialSampler::new(10), 3, drop_last).unwrap())
            .build()
            .unwrap();
        assert_eq!(loader.batch_size(), None);
        assert_eq!(epoch_i64(&loader), want_i64, "{key} via batch_sampler");
    }
}

#[test]
fn shuffle_is_a_new_permutation_per_epoch_and_repeats_per_seed() {
    let data: Vec<i64> = (0..50).collect();
    let make = |seed| DataLoader::builder(data.clone()).batch_size(7).shuffle(true).seed(seed).build().unwrap();
    let loader = make(11);
    assert_eq!(loader.len(), 8);
    let epochs: Vec<Vec<i64>> = (0..3).map(|_| epoch_i64(&loader).concat()).collect();
    for e in &epochs {
        let mut sorted = e.clone();
        sorted.sort();
        assert_eq!(sorted, data, "an epoch visits every sample once");
    }
    assert_ne!(epochs[0], epochs[1]);
    assert_ne!(epochs[1], epochs[2]);
    assert_ne!(epochs[0], data, "shuffled");

    let again = make(11);
    let replay: Vec<Vec<i64>> = (0..3).map(|_| epoch_i64(&again).concat()).collect();
    assert_eq!(replay, epochs, "same seed, same epochs");
    assert_ne!(epoch_i64(&make(12)).concat(), epochs[0], "another seed, another order");

    // Unseeded shuffling draws from the default generator, so manual_seed replays it (the only
    // test in this file that uses the default generator; the rest seed their loaders). With
    // workers, the epoch's order is drawn before the workers' base seed.
    let unseeded = || DataLoader::builder(data.clone()).batch_size(50).shuffle(true);
    let (a, b) = (unseeded().build().unwrap(), unseeded().num_workers(2).build().unwrap());
    tracegrad::manual_seed(5);
    let first = epoch_i64(&a);
    tracegrad::manual_seed(5);
    assert_eq!(epoch_i64(&b), first);
}

#[test]
fn samplers() {
    assert_eq!(SequentialSampler::new(4).iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    let rs = RandomSampler::with_seed(6, 1).unwrap();
    assert_eq!(rs.len(), 6);
    let (e1, e2): (Vec<usize>, Vec<usize>) = (rs.iter().collect(), rs.iter().collect());
    assert_ne!(e1, e2);
    assert_eq!(RandomSampler::with_seed(6, 1).unwrap().iter().collect::<Vec<_>>(), e1);

    // num_samples beyond n chains permutations; with replacement, draws stay in range.
    let long = RandomSampler::with_options(4, false, Some(10), Some(tracegrad::Generator::new(0))).unwrap();
    let idx: Vec<usize> = long.iter().collect();
    assert_eq!(idx.len(), 10);
    let mut first4 = idx[..4].to_vec();
    first4.sort();
    assert_eq!(first4, vec![0, 1, 2, 3]);
    let with = RandomSampler::with_options(3, true, Some(40), Some(tracegrad::Generator::new(0))).unwrap();
    assert!(with.iter().all(|i| i < 3));
    assert_eq!(with.len(), 40);
    assert_eq!(
        err_text(RandomSampler::with_options(3, true, Some(0), None)),
        "num_samples should be a positive integer value, but got num_samples=0"
    );

    let subset = SubsetRandomSampler::with_seed(vec![1, 3, 7, 9], 0);
    let mut got: Vec<usize> = subset.iter().collect();
    got.sort();
    assert_eq!(got, vec![1, 3, 7, 9]);

    // A shared sampler: the loader and the caller see the same object.
    let shared = Arc::new(SequentialSampler::new(5));
    let loader =
        DataLoader::builder((0..5i64).collect::<Vec<_>>()).sampler(shared.clone()).batch_size(2).build().unwrap();
    assert_eq!(loader.sampler().len(), shared.len());
    assert_eq!(epoch_i64(&loader), vec![vec![0, 1], vec![2, 3], vec![4]]);
}

#[test]
fn drop_last() {
    let data: Vec<i64> = (0..10).collect();
    for (drop_last, sizes) in [(false, vec![4, 4, 2]), (true, vec![4, 4])] {
        let loader = DataLoader::builder(data.clone()).batch_size(4).drop_last(drop_last).build().unwrap();
        assert_eq!(loader.len(), sizes.len());
        assert_eq!(loader.iter().map(|b| b.unwrap().numel()).collect::<Vec<_>>(), sizes);
        let shuffled =
            DataLoader::builder(data.clone()).batch_size(4).drop_last(drop_last).shuffle(true).seed(3).build().unwrap();
        assert_eq!(shuffled.iter().map(|b| b.unwrap().numel()).collect::<Vec<_>>(), sizes);
    }
}

#[test]
fn option_errors_have_pytorchs_texts() {
    let ds = || (0..10i64).collect::<Vec<_>>();
    let bs = || BatchSampler::new(SequentialSampler::new(10), 3, false).unwrap();
    let batch_sampler_text =
        "batch_sampler option is mutually exclusive with batch_size, shuffle, sampler, and drop_last";

    assert_eq!(
        err_text(DataLoader::builder(ds()).sampler(SequentialSampler::new(10)).shuffle(true).build()),
        "sampler option is mutually exclusive with shuffle"
    );
    assert_eq!(err_text(DataLoader::builder(ds()).batch_sampler(bs()).batch_size(4).build()), batch_sampler_text);
    assert_eq!(err_text(DataLoader::builder(ds()).batch_sampler(bs()).batch_size(None).build()), batch_sampler_text);
    assert_eq!(err_text(DataLoader::builder(ds()).batch_sampler(bs()).shuffle(true).build()), batch_sampler_text);
    assert_eq!(
        err_text(DataLoader::builder(ds()).batch_sampler(bs()).sampler(SequentialSampler::new(10)).build()),
        batch_sampler_text
    );
    assert_eq!(err_text(DataLoader::builder(ds()).batch_sampler(bs()).drop_last(true).build()), batch_sampler_text);
    // batch_size=1 is the default, so naming it is allowed (as in PyTorch).
    assert!(DataLoader::builder(ds()).batch_sampler(bs()).batch_size(1).build().is_ok());
    assert_eq!(
        err_text(DataLoader::builder(ds()).batch_size(None).drop_last(true).build()),
        "batch_size=None option disables auto-batching and is mutually exclusive with drop_last"
    );
    assert_eq!(
        err_text(DataLoader::builder(ds()).batch_size(0).build()),
        "batch_size should be a positive integer value, but got batch_size=0"
    );
    assert_eq!(
        err_text(BatchSampler::new(SequentialSampler::new(10), 0, true)),
        "batch_size should be a positive integer value, but got batch_size=0"
    );
    assert_eq!(
        err_text(DataLoader::builder(ds()).prefetch_factor(2).build()),
        "prefetch_factor option could only be specified in multiprocessing.let num_workers > 0 to enable \
         multiprocessing, otherwise set prefetch_factor to None."
    );
    assert_eq!(
        err_text(DataLoader::builder(Vec::<i64>::new()).shuffle(true).build()),
        "num_samples should be a positive integer value, but got num_samples=0"
    );
    // The sampler/shuffle check comes first, as in PyTorch.
    assert_eq!(
        err_text(
            DataLoader::builder(ds()).sampler(SequentialSampler::new(10)).shuffle(true).batch_sampler(bs()).build()
        ),
        "sampler option is mutually exclusive with shuffle"
    );
    let loader = DataLoader::builder(ds()).num_workers(2).seed(0).build().unwrap();
    assert_eq!(loader.prefetch_factor(), Some(2));
}

/// Sleeps a little, differently per index, so that workers finish out of order.
struct Jittery(TensorDataset);

impl Dataset for Jittery {
    type Item = Vec<Tensor>;

    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, index: usize) -> Vec<Tensor> {
        thread::sleep(Duration::from_micros(((index * 7919) % 5) as u64 * 300));
        let mut item = self.0.get(index);
        let worker = data::get_worker_info().map_or(-1, |w| w.id as i64);
        item.push(Tensor::from_vec(vec![worker], &[]));
        item
    }
}

#[test]
fn workers_deliver_the_same_batches_in_order() {
    let x = Tensor::randn_with(&mut tracegrad::Generator::new(0), &[37, 5]);
    let y = Tensor::from_vec((0..37).collect::<Vec<i64>>(), &[37]);
    let ds = Arc::new(Jittery(TensorDataset::new(vec![x, y]).unwrap()));
    let run = |workers: usize, prefetch: Option<usize>| {
        let mut b = DataLoader::builder(ds.clone()).batch_size(4).shuffle(true).seed(9).num_workers(workers);
        if let Some(p) = prefetch {
            b = b.prefetch_factor(p);
        }
        let loader = b.build().unwrap();
        let mut epochs = Vec::new();
        let mut saw_workers = Vec::new();
        for _ in 0..2 {
            let mut batches = Vec::new();
            for batch in &loader {
                let batch = batch.unwrap();
                assert_eq!(batch.len(), 3);
                saw_workers.extend(batch[2].to_vec::<i64>());
                batches.push((batch[0].to_vec::<f32>(), batch[0].shape(), batch[1].to_vec::<i64>()));
            }
            epochs.push(batches);
        }
        (epochs, saw_workers)
    };
    let (serial, ids) = run(0, None);
    assert_eq!(serial[0].len(), 10);
    assert!(ids.iter().all(|&w| w == -1), "no worker info in the calling thread");
    assert_ne!(serial[0], serial[1], "a new order per epoch");
    for (workers, prefetch) in [(2, None), (3, Some(1)), (5, Some(3))] {
        let (threaded, ids) = run(workers, prefetch);
        assert_eq!(threaded, serial, "num_workers={workers} prefetch={prefetch:?}");
        assert!(ids.iter().all(|&w| (0..workers as i64).contains(&w)));
    }
}

/// Panics at one index; counts calls in progress and in total.
struct Faulty {
    n: usize,
    bad: usize,
    delay: Duration,
    active: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Faulty {
    fn new(n: usize, bad: usize, delay: Duration) -> Faulty {
        Faulty { n, bad, delay, active: Arc::default(), calls: Arc::default() }
    }
}

impl Dataset for Faulty {
    type Item = i64;

    fn len(&self) -> usize {
        self.n
    }

    fn get(&self, index: usize) -> i64 {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        thread::sleep(self.delay);
        self.active.fetch_sub(1, Ordering::SeqCst);
        if index == self.bad {
            panic!("bad sample {index}");
        }
        index as i64
    }
}

#[test]
fn a_panicking_get_becomes_an_error_after_the_earlier_batches() {
    for workers in [0, 1, 2, 4] {
        let loader = DataLoader::builder(Faulty::new(20, 9, Duration::ZERO))
            .batch_size(4)
            .num_workers(workers)
            .seed(0)
            .build()
            .unwrap();
        let items: Vec<_> = loader.iter().collect();
        assert_eq!(items.len(), 5, "num_workers={workers}: the epoch goes on after the error");
        assert_eq!(items[0].as_ref().unwrap().to_vec::<i64>(), vec![0, 1, 2, 3]);
        assert_eq!(items[1].as_ref().unwrap().to_vec::<i64>(), vec![4, 5, 6, 7]);
        let err = items[2].as_ref().unwrap_err();
        assert_eq!(err, &DataError::GetPanicked { index: 9, message: "bad sample 9".into() });
        assert_eq!(err.to_string(), "DataLoader worker: dataset.get(9) panicked: bad sample 9");
        assert_eq!(items[3].as_ref().unwrap().to_vec::<i64>(), vec![12, 13, 14, 15]);

        // `?`-style consumption stops at the error with exactly the earlier batches.
        let mut seen = Vec::new();
        let r: Result<(), DataError> = loader.iter().try_for_each(|b| {
            seen.push(b?.to_vec::<i64>());
            Ok(())
        });
        assert_eq!(seen.len(), 2);
        assert!(r.unwrap_err().to_string().contains("dataset.get(9)"));
    }
}

#[test]
fn dropping_mid_epoch_stops_the_workers_promptly() {
    let delay = Duration::from_millis(20);
    let ds = Faulty::new(400, usize::MAX, delay);
    let (active, calls) = (ds.active.clone(), ds.calls.clone());
    let loader = DataLoader::builder(ds).batch_size(8).num_workers(3).seed(0).build().unwrap();
    let mut it = loader.iter();
    assert_eq!(it.next().unwrap().unwrap().to_vec::<i64>(), (0..8).collect::<Vec<_>>());
    thread::sleep(Duration::from_millis(5));
    assert!(active.load(Ordering::SeqCst) > 0, "workers are prefetching");
    let t = Instant::now();
    drop(it);
    let took = t.elapsed();
    // Each worker finishes at most the sample it is on (20 ms), not its whole batch (160 ms).
    assert!(took < Duration::from_millis(150), "drop took {took:?}");
    assert_eq!(active.load(Ordering::SeqCst), 0, "no get in progress after drop");
    let after = calls.load(Ordering::SeqCst);
    assert!(after < 400, "the epoch was not fetched to the end ({after} calls)");
    thread::sleep(Duration::from_millis(60));
    assert_eq!(calls.load(Ordering::SeqCst), after, "no worker still running");
    drop(loader);

    // A panicking sample mid-epoch, then an early drop: still prompt.
    let loader = DataLoader::builder(Faulty::new(100, 5, Duration::from_millis(2)))
        .batch_size(4)
        .num_workers(2)
        .seed(0)
        .build()
        .unwrap();
    let t = Instant::now();
    let mut it = loader.iter();
    assert!(it.next().unwrap().is_ok());
    assert!(it.next().unwrap().is_err());
    drop(it);
    drop(loader);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn tensor_dataset() {
    let a = Tensor::from_vec((0..12).map(|v| v as f32).collect::<Vec<_>>(), &[4, 3]);
    let b = Tensor::from_vec(vec![10i64, 11, 12, 13], &[4]);
    let ds = TensorDataset::new(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(ds.len(), 4);
    let item = ds.get(2);
    assert_eq!(item[0].shape(), vec![3]);
    assert_eq!(item[0].to_vec::<f32>(), vec![6.0, 7.0, 8.0]);
    assert_eq!(item[1].shape(), Vec::<usize>::new());
    assert_eq!(item[1].to_vec::<i64>(), vec![12]);

    let short = Tensor::zeros(&[3, 3]);
    let e = TensorDataset::new(vec![a.clone(), short]).err().unwrap();
    assert_eq!(e, DataError::SizeMismatch);
    assert_eq!(e.to_string(), "Size mismatch between tensors");

    let sub = Subset::new(ds.clone(), vec![3, 1]);
    assert_eq!(sub.get(0)[1].to_vec::<i64>(), vec![13]);

    // Without automatic batching, samples come one by one, unstacked.
    let loader = DataLoader::builder(ds.clone()).batch_size(None).build().unwrap();
    assert_eq!(loader.len(), 4);
    let items: Vec<Vec<Tensor>> = loader.iter().map(Result::unwrap).collect();
    assert_eq!(items.len(), 4);
    assert_eq!(items[3][0].shape(), vec![3]);
    assert_eq!(items[3][1].to_vec::<i64>(), vec![13]);

    // A custom collate function.
    let loader = DataLoader::builder(ds)
        .batch_size(3)
        .collate_fn(|samples: Vec<Vec<Tensor>>| samples.iter().map(|s| s[1].item() as i64).sum::<i64>())
        .num_workers(2)
        .seed(0)
        .build()
        .unwrap();
    assert_eq!(loader.iter().map(Result::unwrap).collect::<Vec<_>>(), vec![33, 13]);
}

#[test]
fn a_collate_panic_is_an_error() {
    let ragged: Vec<Vec<Tensor>> =
        vec![vec![Tensor::zeros(&[2])], vec![Tensor::zeros(&[3])], vec![Tensor::zeros(&[2])]];
    for workers in [0, 2] {
        let loader = DataLoader::builder(ragged.clone()).batch_size(2).num_workers(workers).seed(0).build().unwrap();
        let items: Vec<_> = loader.iter().collect();
        match &items[0] {
            Err(DataError::CollatePanicked { indices, message }) => {
                assert_eq!(indices, &vec![0, 1]);
                assert!(message.contains("stack expects each tensor to be equal size"), "{message}");
            }
            other => panic!("expected a collate error, got {:?}", other.as_ref().map(|_| ())),
        }
        assert_eq!(items[1].as_ref().unwrap()[0].shape(), vec![1, 2]);
    }
}

/// Index batches of uneven sizes, shuffled per epoch: any `Sampler<Vec<usize>>` works.
struct Uneven(Mutex<u64>);

impl Sampler<Vec<usize>> for Uneven {
    fn len(&self) -> usize {
        3
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Vec<usize>> + Send> {
        let mut epoch = self.0.lock().unwrap();
        *epoch += 1;
        let mut batches = vec![vec![0], vec![1, 2], vec![3, 4, 5]];
        batches.rotate_left(*epoch as usize % 3);
        Box::new(batches.into_iter())
    }
}

#[test]
fn custom_batch_sampler_with_workers() {
    let loader = DataLoader::builder((0..6i64).collect::<Vec<_>>())
        .batch_sampler(Uneven(Mutex::new(0)))
        .num_workers(2)
        .seed(0)
        .build()
        .unwrap();
    assert_eq!(loader.len(), 3);
    assert_eq!(epoch_i64(&loader), vec![vec![1, 2], vec![3, 4, 5], vec![0]]);
    assert_eq!(epoch_i64(&loader), vec![vec![3, 4, 5], vec![0], vec![1, 2]]);
}

#[test]
fn training_loop_over_a_tensor_dataset() {
    // y = x·w* + 0.5 with w* = [1, -2, 3]; fit w and b by mini-batch gradient descent.
    let mut g = tracegrad::Generator::new(0);
    let n = 96;
    let x = Tensor::randn_with(&mut g, &[n, 3]);
    let w_true = Tensor::from_vec(vec![1.0f32, -2.0, 3.0], &[3, 1]);
    let y = x.matmul(&w_true).reshape(&[n as isize]).add_scalar(0.5);
    let ds = TensorDataset::new(vec![x, y]).unwrap();
    let loader = DataLoader::builder(ds).batch_size(16).shuffle(true).seed(1).num_workers(2).build().unwrap();
    assert_eq!(loader.len(), 6);

    let w = Tensor::zeros(&[3, 1]).requires_grad_(true);
    let b = Tensor::zeros(&[1]).requires_grad_(true);
    let mut first_loss = None;
    let mut last_loss = 0.0;
    for _epoch in 0..30 {
        for batch in &loader {
            let batch = batch.unwrap();
            let (xb, yb) = (&batch[0], &batch[1]);
            assert_eq!(xb.shape(), vec![16, 3]);
            assert_eq!(yb.shape(), vec![16]);
            let pred = xb.matmul(&w).reshape(&[16]).add(&b);
            let loss = pred.sub(yb).pow(2.0).mean_all();
            last_loss = loss.item();
            first_loss.get_or_insert(last_loss);
            loss.backward();
            for p in [&w, &b] {
                let step = p.grad().unwrap().mul_scalar(0.1);
                p.set_buffer(p.detach().sub(&step).buffer());
                p.zero_grad();
            }
        }
    }
    assert!(last_loss < 1e-4 && last_loss < first_loss.unwrap(), "loss {first_loss:?} -> {last_loss}");
    let w_fit = w.to_vec::<f32>();
    assert!(
        (w_fit[0] - 1.0).abs() < 1e-2 && (w_fit[1] + 2.0).abs() < 1e-2 && (w_fit[2] - 3.0).abs() < 1e-2,
        "{w_fit:?}"
    );
    assert!((b.item() - 0.5).abs() < 1e-2);
}

#[test]
fn labeled_sets_are_datasets() {
    let (train, _) = data::digits().split(0.8, 0);
    let loader =
        DataLoader::builder(train.clone()).batch_size(64).shuffle(true).seed(0).num_workers(2).build().unwrap();
    assert_eq!(loader.len(), train.len().div_ceil(64));
    let mut seen = 0;
    for batch in &loader {
        let batch = batch.unwrap();
        assert_eq!(batch[0].shape()[1], 64);
        assert_eq!(batch[1].dtype(), tracegrad::DType::I64);
        seen += batch[1].numel();
    }
    assert_eq!(seen, train.len());
}
