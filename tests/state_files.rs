//! safetensors state files: reading PyTorch's `net_bn.safetensors`, loading it into the
//! equivalent tracegrad model, round trips, and corrupt input (never a panic).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use serde_json::Value;
use tracegrad::nn::{
    load_safetensors, save_safetensors, state_from_safetensors, state_to_safetensors, BatchNorm1d, Linear, Module,
    ModuleCore, ModuleExt, ReLU, Sequential, StateError, StateErrorKind,
};
use tracegrad::{DType, Tensor};

const NET_BN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference/net_bn.safetensors");

fn net_bn_bytes() -> Vec<u8> {
    std::fs::read(NET_BN).unwrap_or_else(|e| panic!("{NET_BN}: {e}"))
}

/// A scratch file path, unique to this process and test; removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!("tracegrad-state-{}-{name}.safetensors", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `(key, dtype, shape)` straight from a file's JSON header, in header order, read without
/// tracegrad or the `safetensors` crate.
fn raw_header(bytes: &[u8]) -> Vec<(String, String, Vec<usize>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let parsed: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
    let mut out: Vec<(usize, String, String, Vec<usize>)> = parsed
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let pos = text.find(&format!("\"{k}\":")).unwrap();
            let shape = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (pos, k.clone(), v["dtype"].as_str().unwrap().to_string(), shape)
        })
        .collect();
    out.sort_by_key(|e| e.0);
    out.into_iter().map(|(_, k, d, s)| (k, d, s)).collect()
}

/// net_bn.json's `keys_and_dtypes` as `(key, safetensors dtype)`, in the JSON's (PyTorch
/// state_dict) order.
fn reference_keys() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference/net_bn.json");
    let text = std::fs::read_to_string(path).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let section = text.find("\"keys_and_dtypes\"").unwrap();
    let mut keys: Vec<(usize, String, String)> = json["keys_and_dtypes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let dtype = match v.as_str().unwrap() {
                "torch.float32" => "F32",
                "torch.float64" => "F64",
                "torch.int64" => "I64",
                "torch.bool" => "BOOL",
                "torch.uint8" => "U8",
                other => panic!("unexpected dtype {other}"),
            };
            (section + text[section..].find(&format!("\"{k}\":")).unwrap(), k.clone(), dtype.to_string())
        })
        .collect();
    keys.sort_by_key(|e| e.0);
    keys.into_iter().map(|(_, k, d)| (k, d)).collect()
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::Bool => "BOOL",
        DType::U8 => "U8",
    }
}

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v
}

#[test]
fn pytorch_file_keys_dtypes_and_shapes() {
    let state = state_from_safetensors(&net_bn_bytes()).expect("PyTorch's file loads");
    let got: Vec<(String, String)> = state.iter().map(|(k, t)| (k.clone(), st_dtype(t.dtype()).to_string())).collect();
    assert_eq!(sorted(&got), sorted(&reference_keys()), "keys and dtypes against net_bn.json");

    // Storage order, which for this file is also the header's order.
    let header = raw_header(&net_bn_bytes());
    let header_keys: Vec<&str> = header.iter().map(|h| h.0.as_str()).collect();
    let keys: Vec<&str> = state.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, header_keys);
    assert_eq!(keys[0], "features.1.num_batches_tracked", "I64 first (descending alignment, then name)");

    let shapes: Vec<(&str, Vec<usize>)> = state.iter().map(|(k, t)| (k.as_str(), t.shape())).collect();
    let want: Vec<(&str, Vec<usize>)> = vec![
        ("features.1.num_batches_tracked", vec![]),
        ("features.0.bias", vec![32]),
        ("features.0.weight", vec![32, 64]),
        ("features.1.bias", vec![32]),
        ("features.1.running_mean", vec![32]),
        ("features.1.running_var", vec![32]),
        ("features.1.weight", vec![32]),
        ("head.bias", vec![10]),
        ("head.weight", vec![10, 32]),
    ];
    assert_eq!(shapes, want);
    for ((k, t), (hk, hd, hs)) in state.iter().zip(&header) {
        assert_eq!((k, st_dtype(t.dtype()), t.shape()), (hk, hd.as_str(), hs.clone()));
    }

    let nbt = &state[0].1;
    assert_eq!(nbt.dtype(), DType::I64);
    assert_eq!(nbt.to_vec::<i64>(), vec![3], "3 train-mode batches");
    // The running statistics were updated, so they are not at their initial values.
    let var = state.iter().find(|(k, _)| k == "features.1.running_var").unwrap().1.to_vec_f32();
    assert!(var.iter().any(|&v| v != 1.0));
}

#[test]
fn pytorch_file_rewrites_byte_for_byte() {
    let bytes = net_bn_bytes();
    let state = state_from_safetensors(&bytes).unwrap();
    assert_eq!(state_to_safetensors(&state).unwrap(), bytes);
}

#[test]
fn every_dtype_round_trips() {
    let state = vec![
        ("f32".to_string(), Tensor::from_vec(vec![1.5f32, -2.0, f32::INFINITY, 0.0, -0.0, 7.25], &[2, 3])),
        ("f64".to_string(), Tensor::from_vec(vec![std::f64::consts::PI, -1e300], &[2])),
        ("i64".to_string(), Tensor::from_vec(vec![i64::MIN, -1, 0, i64::MAX], &[2, 1, 2])),
        ("bool".to_string(), Tensor::from_vec(vec![true, false, true], &[3])),
        ("u8".to_string(), Tensor::from_vec(vec![0u8, 1, 128, 255], &[4])),
        ("scalar".to_string(), Tensor::from_vec(vec![42i64], &[])),
        ("empty".to_string(), Tensor::from_vec(Vec::<f32>::new(), &[0, 5])),
        ("nan".to_string(), Tensor::from_vec(vec![f32::NAN], &[1])),
    ];
    let bytes = state_to_safetensors(&state).unwrap();
    let back = state_from_safetensors(&bytes).unwrap();
    assert_eq!(back.len(), state.len());
    let header = raw_header(&bytes);
    for (k, t) in &state {
        let (_, b) = back.iter().find(|(bk, _)| bk == k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!((b.dtype(), b.shape()), (t.dtype(), t.shape()), "{k}");
        assert_eq!(format!("{:?}", b.buffer()), format!("{:?}", t.buffer()), "{k}");
        let bits = |x: &Tensor| x.buffer().to_f64_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(b), bits(t), "{k}: bit-exact");
        let h = header.iter().find(|h| &h.0 == k).unwrap();
        assert_eq!((h.1.as_str(), &h.2), (st_dtype(t.dtype()), &t.shape()), "{k}: header");
    }
    assert_eq!(header.iter().find(|h| h.0 == "scalar").unwrap().2, Vec::<usize>::new(), "0-d is shape []");
    // An empty state is a valid (header-only) file.
    let empty = state_to_safetensors(&[]).unwrap();
    assert!(state_from_safetensors(&empty).unwrap().is_empty());
}

#[test]
fn duplicate_keys_are_refused_when_writing() {
    let t = Tensor::zeros(&[2]);
    let err = state_to_safetensors(&[("a".into(), t.clone()), ("a".into(), t)]).unwrap_err();
    assert!(matches!(err.kind(), StateErrorKind::DuplicateKey(k) if k == "a"), "{err}");
}

/// A hand-written file: `header` JSON, padded, then `data`.
fn file_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(data);
    out
}

#[test]
fn unsupported_dtypes_name_the_key() {
    for (dtype, shape, n) in
        [("BF16", "[2]", 4), ("F16", "[3]", 6), ("I32", "[1]", 4), ("U64", "[]", 8), ("I8", "[2]", 2)]
    {
        let bytes = file_with_header(
            &format!(r#"{{"model.w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,{n}]}}}}"#),
            &vec![0; n],
        );
        let err = state_from_safetensors(&bytes).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err.kind(), StateErrorKind::UnsupportedDtype { key, dtype: d } if key == "model.w" && d == dtype),
            "{dtype}: {msg}"
        );
        assert!(msg.contains("\"model.w\"") && msg.contains(dtype), "{msg}");
    }

    // PyTorch's file with head.bias relabelled as BF16 (same byte count: 20 bf16 values).
    let bytes = net_bn_bytes();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let old = r#""head.bias":{"dtype":"F32","shape":[10],"#;
    let new = r#""head.bias":{"dtype":"BF16","shape":[20],"#;
    assert!(header.contains(old));
    let patched = file_with_header(header.trim_end().replace(old, new).as_str(), &bytes[8 + n..]);
    let err = state_from_safetensors(&patched).unwrap_err();
    assert!(matches!(err.kind(), StateErrorKind::UnsupportedDtype { key, .. } if key == "head.bias"), "{err}");

    // Through a file, the error names the file too.
    let tmp = TempFile::new("bf16");
    std::fs::write(&tmp.0, &patched).unwrap();
    let err = load_safetensors(&Linear::new(32, 10), &tmp.0, false).unwrap_err();
    assert_eq!(err.path(), Some(tmp.0.as_path()));
    let msg = err.to_string();
    assert!(msg.contains(&tmp.0.display().to_string()) && msg.contains("head.bias") && msg.contains("BF16"), "{msg}");
}

/// Runs the reader on `bytes` under `catch_unwind`; returns whether it returned Ok, and
/// records a panic as a failure of `what`.
fn no_panic(what: &str, bytes: &[u8], panics: &mut Vec<String>) -> Option<bool> {
    match catch_unwind(AssertUnwindSafe(|| state_from_safetensors(bytes).map(|s| s.len()))) {
        Ok(r) => {
            if let Err(e) = &r {
                // Every error renders, and its source chain is walkable.
                assert!(!e.to_string().is_empty());
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    src = s.source();
                }
            }
            Some(r.is_ok())
        }
        Err(_) => {
            panics.push(what.to_string());
            None
        }
    }
}

fn set_len(bytes: &[u8], n: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[..8].copy_from_slice(&n.to_le_bytes());
    b
}

#[test]
fn corrupt_and_truncated_files_are_errors_not_panics() {
    let bytes = net_bn_bytes();
    let len = bytes.len();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header_end = 8 + hlen;
    let mut panics = Vec::new();
    let mut cases = 0usize;
    let mut check = |what: String, b: &[u8], panics: &mut Vec<String>| {
        cases += 1;
        no_panic(&what, b, panics)
    };

    // (a) Truncation: every cut is an error.
    let mut cuts = vec![0, 1, 7, 8, header_end - 1, header_end, header_end + 1, len - 1];
    cuts.extend((0..len).step_by(97));
    for cut in cuts {
        let r = check(format!("truncate at {cut}"), &bytes[..cut], &mut panics);
        assert_ne!(r, Some(true), "truncated at {cut} of {len} bytes, yet it loaded");
    }
    // Trailing garbage is an error as well (the data must cover the file exactly).
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(check("one byte appended".into(), &longer, &mut panics), Some(false));

    // (b) Every bit of the length prefix and the header flipped, and every header byte
    // overwritten with bytes that matter to JSON and UTF-8.
    for i in 0..header_end {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            check(format!("flip bit {bit} of byte {i}"), &b, &mut panics);
        }
        for v in [0x00, 0xff, 0x80, 0xc3, b'"', b'{', b'}', b'[', b']', b',', b':', b'9', b'-', b'e', b'\\'] {
            let mut b = bytes.clone();
            b[i] = v;
            check(format!("byte {i} := {v:#04x}"), &b, &mut panics);
        }
    }
    // Flips in the length prefix never load.
    for i in 0..8 {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert_eq!(state_from_safetensors(&b).ok().map(|_| ()), None, "length prefix bit {bit} of byte {i}");
        }
    }

    // (c) Huge and off-by-some header lengths.
    for n in [
        u64::MAX,
        u64::MAX - 7,
        1 << 63,
        1 << 32,
        100_000_000,
        100_000_001,
        len as u64,
        len as u64 - 8,
        len as u64 - 7,
        hlen as u64 + 8,
        hlen as u64 - 8,
        hlen as u64 - 1,
        hlen as u64 + 1,
        0,
        1,
        2,
    ] {
        let r = check(format!("header length {n}"), &set_len(&bytes, n), &mut panics);
        assert_eq!(r, Some(false), "header length {n}");
    }

    // (d) Random corruption from a fixed-seed LCG: a few bytes anywhere, sometimes also a cut.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state >> 33
    };
    for case in 0..400 {
        let mut b = bytes.clone();
        let edits = 1 + next() % 8;
        for _ in 0..edits {
            // Bias half the edits into the header, where they matter most.
            let span = if next() % 2 == 0 { header_end } else { len };
            let i = (next() as usize) % span;
            b[i] = next() as u8;
        }
        if case % 5 == 0 {
            let cut = (next() as usize) % (b.len() + 1);
            b.truncate(cut);
        }
        check(format!("random case {case}"), &b, &mut panics);
    }

    // Hand-written hostile headers.
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("empty object", file_with_header("{}", &[])),
        ("not an object", file_with_header("[1,2,3]", &[])),
        ("bare string", file_with_header("\"x\"", &[])),
        (
            "not UTF-8",
            file_with_header("{\"\u{ff}\":1}", &[]).into_iter().map(|c| if c == 0xc3 { 0xff } else { c }).collect(),
        ),
        ("unknown dtype", file_with_header(r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#, &[0])),
        ("negative offset", file_with_header(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}"#, &[0])),
        ("reversed offsets", file_with_header(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#, &[0])),
        ("gap", file_with_header(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#, &[0, 0])),
        ("size mismatch", file_with_header(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, &[0; 4])),
        ("missing data", file_with_header(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 4])),
        (
            "shape overflow",
            file_with_header(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, &[]),
        ),
        (
            "element overflow",
            file_with_header(r#"{"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}}"#, &[]),
        ),
        (
            "zero-size huge dims",
            file_with_header(r#"{"a":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}"#, &[]),
        ),
        (
            "offsets near usize::MAX",
            file_with_header(
                r#"{"a":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[0,2305843009213693951]},
                    "b":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[2305843009213693951,4611686018427387902]},
                    "c":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[4611686018427387902,6917529027641081853]},
                    "d":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[6917529027641081853,9223372036854775804]},
                    "e":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[9223372036854775804,11529215046068469755]},
                    "f":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[11529215046068469755,13835058055282163706]},
                    "g":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[13835058055282163706,16140901064495857657]},
                    "h":{"dtype":"U8","shape":[2305843009213693951],"data_offsets":[16140901064495857657,18446744073709551608]}}"#,
                &[],
            ),
        ),
        (
            "offset beyond u64",
            file_with_header(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551616]}}"#, &[0]),
        ),
        ("float offset", file_with_header(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.5]}}"#, &[0])),
        (
            "duplicate key",
            file_with_header(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                &[0, 0],
            ),
        ),
        (
            "bad metadata",
            file_with_header(
                r#"{"__metadata__":{"format":7},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
                &[0],
            ),
        ),
        ("missing field", file_with_header(r#"{"a":{"dtype":"U8","shape":[1]}}"#, &[0])),
        ("deep nesting", file_with_header(&format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)), &[])),
    ];
    for (what, b) in &hostile {
        let r = check(what.to_string(), b, &mut panics);
        let want = *what == "empty object" || *what == "zero-size huge dims";
        assert_eq!(
            r,
            Some(want),
            "{what}: {:?}",
            state_from_safetensors(b).map(|s| s.len()).map_err(|e| e.to_string())
        );
    }
    // Metadata with string values is fine, as PyTorch writes it with `metadata={"format": "pt"}`.
    let with_meta = file_with_header(
        r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}"#,
        &7i64.to_le_bytes(),
    );
    let s = state_from_safetensors(&with_meta).unwrap();
    assert_eq!((s[0].0.as_str(), s[0].1.to_vec::<i64>()), ("a", vec![7]));

    assert!(panics.is_empty(), "{} of {cases} cases panicked: {:?}", panics.len(), &panics[..panics.len().min(20)]);
    assert!(cases > 10_000, "{cases} cases");
}

#[test]
fn missing_file_names_the_path() {
    let path = std::env::temp_dir().join(format!("tracegrad-state-{}-does-not-exist.safetensors", std::process::id()));
    let err: StateError = load_safetensors(&Linear::new(2, 2), &path, true).unwrap_err();
    assert!(matches!(err.kind(), StateErrorKind::Io(e) if e.kind() == std::io::ErrorKind::NotFound), "{err}");
    assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

/// A one-layer model for the shape-mismatch check below.
#[derive(Module)]
struct Head {
    #[module]
    head: Linear,
    core: ModuleCore,
}

impl Module for Head {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.head.call(x)
    }
}

fn values(m: &impl ModuleExt) -> Vec<(String, DType, Vec<usize>, Vec<f64>)> {
    m.state_dict().into_iter().map(|(k, t)| (k, t.dtype(), t.shape(), t.to_vec_f64())).collect()
}

#[test]
fn shape_mismatch_is_load_state_dict_error_and_changes_nothing() {
    // PyTorch's file into a model whose head is Linear(32, 5): head.weight/head.bias mismatch.
    let m = Head { head: Linear::new(32, 5), core: ModuleCore::new() };
    let before = values(&m);
    let err = load_safetensors(&m, NET_BN, false).unwrap_err();
    let StateErrorKind::Load(e) = err.kind() else { panic!("expected a load_state_dict error, got {err}") };
    assert!(e.0.starts_with("RuntimeError: Error(s) in loading state_dict for Head:"), "{e}");
    assert!(e.0.contains("size mismatch for head.weight: copying a param with shape torch.Size([10, 32]) from checkpoint, the shape in current model is torch.Size([5, 32])."), "{e}");
    assert!(e.0.contains("size mismatch for head.bias: copying a param with shape torch.Size([10]) from checkpoint, the shape in current model is torch.Size([5])."), "{e}");
    assert_eq!(err.path(), Some(std::path::Path::new(NET_BN)));
    assert!(err.to_string().contains("net_bn.safetensors: RuntimeError: Error(s) in loading state_dict"), "{err}");
    assert_eq!(values(&m), before, "a failed load changes nothing");

    // The matching shape loads non-strictly, reporting the features.* keys as unexpected.
    let ok = Head { head: Linear::new(32, 10), core: ModuleCore::new() };
    let report = load_safetensors(&ok, NET_BN, false).unwrap();
    assert!(report.missing.is_empty());
    assert_eq!(report.unexpected.len(), 7);
    let state = state_from_safetensors(&net_bn_bytes()).unwrap();
    let want = state.iter().find(|(k, _)| k == "head.weight").unwrap().1.to_vec_f32();
    assert_eq!(ok.head.weight.to_vec_f32(), want);
    // Strictly, the extra keys are an error, and again nothing changes.
    let fresh = Head { head: Linear::new(32, 10), core: ModuleCore::new() };
    let before = values(&fresh);
    let err = load_safetensors(&fresh, NET_BN, true).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("Unexpected key(s) in state_dict: ") && msg.contains("\"features.0.weight\""), "{msg}");
    assert_eq!(values(&fresh), before);
}

/// PyTorch's `Net`: `features = Sequential(Linear(64, 32), BatchNorm1d(32), ReLU)`,
/// `head = Linear(32, 10)`.
#[derive(Module)]
struct Net {
    #[module]
    features: Sequential,
    #[module]
    head: Linear,
    core: ModuleCore,
}

impl Net {
    fn new() -> Net {
        Net::sized(64, 32, 10)
    }

    fn sized(inp: usize, hidden: usize, out: usize) -> Net {
        Net {
            features: Sequential::new().add(Linear::new(inp, hidden)).add(BatchNorm1d::new(hidden)).add(ReLU::new()),
            head: Linear::new(hidden, out),
            core: ModuleCore::new(),
        }
    }
}

impl Module for Net {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.head.call(&self.features.call(x))
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn pytorch_file_into_net_reproduces_eval_output() {
    let reference = common::reference("net_bn.json");
    let net = Net::new();
    // The same keys, in PyTorch's state_dict order, with the same dtypes.
    let keys: Vec<(String, String)> =
        net.state_dict().iter().map(|(k, t)| (k.clone(), st_dtype(t.dtype()).to_string())).collect();
    assert_eq!(keys, reference_keys());

    let report = load_safetensors(&net, NET_BN, true).expect("strict load of PyTorch's file");
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report:?}");
    let nbt = net.get_buffer("features.1.num_batches_tracked").unwrap();
    assert_eq!((nbt.dtype(), nbt.to_vec::<i64>()), (DType::I64, vec![3]));
    let state = state_from_safetensors(&net_bn_bytes()).unwrap();
    for (k, t) in net.state_dict() {
        let (_, want) = state.iter().find(|(s, _)| *s == k).unwrap();
        assert_eq!(format!("{:?}", t.buffer()), format!("{:?}", want.buffer()), "{k}");
        assert_eq!(t.to_vec_f64(), want.to_vec_f64(), "{k}");
    }

    net.eval();
    let x = common::tensor(&reference["input"]);
    let y = net.call(&x);
    common::assert_close("eval output", &y, &reference["output_eval"], 1e-5, 1e-5);
}

#[test]
fn net_round_trips_through_a_file() {
    let x = common::tensor(&common::reference("net_bn.json")["input"]);
    let loaded = Net::new();
    load_safetensors(&loaded, NET_BN, true).unwrap();
    loaded.eval();

    let tmp = TempFile::new("roundtrip");
    save_safetensors(&loaded, &tmp.0).unwrap();
    let written = std::fs::read(&tmp.0).unwrap();

    // The written file has PyTorch's keys, dtypes and shapes, in the same header order; as the
    // data is the same too, it is PyTorch's file byte for byte.
    assert_eq!(raw_header(&written), raw_header(&net_bn_bytes()));
    assert_eq!(written, net_bn_bytes());

    let fresh = Net::new();
    assert_ne!(bits(&fresh.eval().call(&x)), bits(&loaded.call(&x)), "a fresh model differs before loading");
    let report = load_safetensors(&fresh, &tmp.0, true).unwrap();
    assert_eq!(report, Default::default());
    assert_eq!(bits(&fresh.call(&x)), bits(&loaded.call(&x)), "identical outputs");
    for ((k1, a), (k2, b)) in fresh.state_dict().iter().zip(loaded.state_dict().iter()) {
        assert_eq!(k1, k2);
        assert_eq!(format!("{:?}", a.buffer()), format!("{:?}", b.buffer()), "{k1}");
    }

    // A model trained a step further in train mode writes its updated running stats.
    let trained = Net::new();
    load_safetensors(&trained, &tmp.0, true).unwrap();
    trained.train(true).call(&x);
    save_safetensors(&trained, &tmp.0).unwrap();
    let back = Net::new();
    load_safetensors(&back, &tmp.0, true).unwrap();
    assert_eq!(back.get_buffer("features.1.num_batches_tracked").unwrap().to_vec::<i64>(), vec![4]);
    assert_eq!(
        back.get_buffer("features.1.running_mean").unwrap().to_vec_f32(),
        trained.get_buffer("features.1.running_mean").unwrap().to_vec_f32()
    );
}

#[test]
fn pytorch_file_into_differently_sized_net_is_refused() {
    let net = Net::sized(64, 16, 10);
    let before = values(&net);
    let err = load_safetensors(&net, NET_BN, true).unwrap_err();
    let StateErrorKind::Load(e) = err.kind() else { panic!("expected a load_state_dict error, got {err}") };
    let msg = &e.0;
    assert!(msg.starts_with("RuntimeError: Error(s) in loading state_dict for Net:"), "{msg}");
    for (k, file, model) in [
        ("features.0.weight", "[32, 64]", "[16, 64]"),
        ("features.0.bias", "[32]", "[16]"),
        ("features.1.weight", "[32]", "[16]"),
        ("features.1.bias", "[32]", "[16]"),
        ("features.1.running_mean", "[32]", "[16]"),
        ("features.1.running_var", "[32]", "[16]"),
        ("head.weight", "[10, 32]", "[10, 16]"),
    ] {
        let line = format!("size mismatch for {k}: copying a param with shape torch.Size({file}) from checkpoint, the shape in current model is torch.Size({model}).");
        assert!(msg.contains(&line), "missing {line:?} in {msg}");
    }
    assert!(!msg.contains("num_batches_tracked") && !msg.contains("head.bias"), "{msg}");
    assert_eq!(values(&net), before, "a failed load changes nothing");
}
