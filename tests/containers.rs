//! Containers against PyTorch's transcript `containers.json`: Sequential (named and
//! positional, slicing keeps names), ModuleList, ModuleDict, shared-module deduplication and
//! reprs; plus the editing operations (append, insert, extend, remove, replace).

mod common;

use std::sync::{Arc, Mutex};

use common::{assert_close, reference, strings};
use serde_json::Value;
use tracegrad::nn::{Linear, Module, ModuleCore, ModuleDict, ModuleExt, ModuleList, ReLU, Sequential};
use tracegrad::Tensor;

/// `x + value`, printed as `AddV(value=3)`.
#[derive(tracegrad::nn::Module)]
struct AddV {
    value: i64,
    core: ModuleCore,
}

fn add_v(value: i64) -> Arc<AddV> {
    Arc::new(AddV { value, core: ModuleCore::new() })
}

impl Module for AddV {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.add_scalar(self.value as f64)
    }
    fn extra_repr(&self) -> String {
        format!("value={}", self.value)
    }
}

fn case(name: &str) -> Value {
    reference("containers.json")[name].clone()
}

fn one() -> Tensor {
    Tensor::vec1(&[1.0])
}

fn child_names(m: &dyn Module) -> Vec<String> {
    m.named_children().into_iter().map(|(n, _)| n).collect()
}

fn named(children: &[(&str, Arc<AddV>)]) -> Sequential {
    Sequential::from_named(children.iter().map(|(n, m)| (n.to_string(), m.clone() as Arc<dyn Module>)).collect())
}

/// The value an `AddV` adds, read through its forward.
fn value_of(m: &dyn Module) -> f64 {
    m.call(&Tensor::vec1(&[0.0])).item()
}

#[test]
fn sequential_from_ordered_dict() {
    let r = case("sequential_ordereddict");
    let seq = named(&[("plus1", add_v(3)), ("plus2", add_v(2)), ("plus3", add_v(5))]);
    assert_eq!(child_names(&seq), strings(&r["names"]));
    assert_eq!(seq.names(), strings(&r["names"]));
    assert_close("out_of_1", &seq.call(&one()), &r["out_of_1"], 1e-6, 0.0);
    assert_eq!(seq.repr(), r["repr"].as_str().unwrap());
    assert_eq!(seq.get_submodule("plus2").unwrap().repr(), "AddV(value=2)");
}

#[test]
fn sequential_positional_indexing_and_slicing() {
    let r = case("sequential_positional");
    let last = add_v(3);
    let seq = Sequential::new().add(add_v(1)).add(add_v(2)).add(last.clone());
    assert_eq!(child_names(&seq), strings(&r["names"]));
    let slice = seq.slice(1..);
    assert_eq!(child_names(&slice), strings(&r["slice_1_names"]));
    assert_eq!(slice.len(), 2);
    // The slice shares the modules themselves.
    assert!(Arc::ptr_eq(&slice.get(-1).unwrap(), &(last.clone() as Arc<dyn Module>)));
    let want = r["neg_index_value"].as_i64().unwrap();
    let neg = seq.get(-1).unwrap();
    assert!(Arc::ptr_eq(&neg, &(last.clone() as Arc<dyn Module>)));
    assert_eq!(last.value, want);
    assert_eq!(value_of(&seq[-1]), want as f64);
    assert_eq!(value_of(&seq[0]), 1.0);
    assert!(seq.get(3).is_none() && seq.get(-4).is_none());
    // Python slice bounds: negative ends, clamping.
    assert_eq!(seq.slice(..-1).names(), ["0", "1"]);
    assert_eq!(seq.slice(-2..).names(), ["1", "2"]);
    assert_eq!(seq.slice(1..100).names(), ["1", "2"]);
    assert!(seq.slice(5..).is_empty());
    // Slicing a named Sequential keeps those names too.
    let n = named(&[("a", add_v(1)), ("b", add_v(2)), ("c", add_v(3))]);
    assert_eq!(n.slice(1..).repr(), "Sequential(\n  (b): AddV(value=2)\n  (c): AddV(value=3)\n)");
}

#[test]
#[should_panic(expected = "IndexError: index 3 is out of range")]
fn sequential_index_out_of_range() {
    let seq = Sequential::new().add(add_v(1)).add(add_v(2)).add(add_v(3));
    let _ = &seq[3];
}

#[test]
fn sequential_append_insert_extend_remove() {
    let seq = Sequential::new().add(add_v(1));
    seq.append(add_v(2)).extend([add_v(4), add_v(5)]);
    seq.insert(2, add_v(3));
    assert_eq!(seq.names(), ["0", "1", "2", "3", "4"]);
    let values: Vec<f64> = seq.iter().map(|m| value_of(&*m)).collect();
    assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0]);
    seq.insert(-1, add_v(45));
    assert_eq!(value_of(&seq[-2]), 45.0);
    seq.insert(0, add_v(0));
    assert_eq!(value_of(&seq[0]), 0.0);
    assert_eq!(seq.names(), ["0", "1", "2", "3", "4", "5", "6"]);
    let mut seq = seq;
    let removed = seq.remove(-2);
    assert_eq!(value_of(&*removed), 45.0);
    assert_eq!(seq.names(), ["0", "1", "2", "3", "4", "5"]);
    let old = seq.replace(0, add_v(100));
    assert_eq!(value_of(&*old), 0.0);
    assert_eq!(seq.call(&Tensor::vec1(&[0.0])).item(), 115.0);
    // `push` takes a shared `Arc<dyn Module>` as before.
    let shared: Arc<dyn Module> = add_v(7);
    seq.push(shared.clone());
    assert!(Arc::ptr_eq(&seq.get(-1).unwrap(), &shared));
}

#[test]
fn named_sequential_edits_follow_pytorch() {
    let mut seq = named(&[("a", add_v(1)), ("b", add_v(2))]);
    // append names by position; insert at the end is an append.
    seq.append(add_v(3));
    seq.insert(3, add_v(4));
    assert_eq!(seq.names(), ["a", "b", "2", "3"]);
    // del seq[i] renumbers every child, named ones included.
    seq.remove(0);
    assert_eq!(seq.names(), ["0", "1", "2"]);
}

#[test]
#[should_panic(expected = "KeyError: '1'")]
fn named_sequential_insert_in_the_middle_is_a_key_error() {
    let seq = named(&[("a", add_v(1)), ("b", add_v(2))]);
    seq.insert(0, add_v(0));
}

#[test]
#[should_panic(expected = "IndexError: Index out of range: 4")]
fn sequential_insert_out_of_range() {
    Sequential::new().add(add_v(1)).insert(4, add_v(0));
}

#[test]
fn modulelist_order_and_repr() {
    let r = case("modulelist");
    let list: ModuleList = [add_v(2), add_v(3), add_v(5)].into_iter().collect();
    assert_eq!(child_names(&list), strings(&r["names"]));
    let mut h = one();
    for i in [1, 0, 2] {
        h = list[i].call(&h);
    }
    assert_close("order_1_0_2_of_1", &h, &r["order_1_0_2_of_1"], 1e-6, 0.0);
    assert_eq!(list.repr(), r["repr"].as_str().unwrap());
}

#[test]
fn modulelist_editing_and_iteration() {
    let list = ModuleList::new().add(add_v(1));
    list.append(add_v(3)).extend(vec![add_v(4)]);
    list.insert(1, add_v(2));
    list.insert(-4, add_v(0));
    assert_eq!(child_names(&list), ["0", "1", "2", "3", "4"]);
    let values: Vec<f64> = (&list).into_iter().map(|m| value_of(&*m)).collect();
    assert_eq!(values, [0.0, 1.0, 2.0, 3.0, 4.0]);
    // Slicing a ModuleList renumbers, as `ModuleList(list(...)[idx])` does.
    let tail = list.slice(3..);
    assert_eq!(child_names(&tail), ["0", "1"]);
    assert_eq!(value_of(&tail[0]), 3.0);
    let mut list = list;
    assert_eq!(value_of(&*list.remove(0)), 0.0);
    assert_eq!(child_names(&list), ["0", "1", "2", "3"]);
    assert_eq!(value_of(&*list.replace(-1, add_v(40))), 4.0);
    assert_eq!(value_of(&list[-1]), 40.0);
    assert_eq!(list.len(), 4);
    assert!(list.get(4).is_none());
}

#[test]
#[should_panic(expected = "ModuleList has no forward; index it")]
fn modulelist_has_no_forward() {
    let list = ModuleList::new().add(add_v(1));
    list.call(&one());
}

#[test]
fn moduledict_keeps_insertion_order() {
    let r = case("moduledict");
    let mut dict = ModuleDict::new().add("add2", add_v(2)).add("add3", add_v(3)).add("add5", add_v(5));
    assert_eq!(child_names(&dict), strings(&r["names"]));
    assert_eq!(dict.keys(), strings(&r["names"]));
    assert_eq!(dict.repr(), r["repr"].as_str().unwrap());
    assert_eq!(value_of(&dict["add3"]), 3.0);
    assert_eq!(value_of(&*dict.get("add5").unwrap()), 5.0);
    assert!(dict.get("add4").is_none() && dict.contains_key("add2"));
    // Replacing keeps the place; a new key goes last; removal closes the gap.
    let old = dict.insert("add3", add_v(30)).unwrap().unwrap();
    assert_eq!(value_of(&*old), 3.0);
    assert!(dict.insert("add7", add_v(7)).unwrap().is_none());
    assert_eq!(dict.keys(), ["add2", "add3", "add5", "add7"]);
    assert_eq!(value_of(&*dict.remove("add2").unwrap()), 2.0);
    assert!(dict.remove("add2").is_none());
    assert_eq!(child_names(&dict), ["add3", "add5", "add7"]);
    assert_eq!(dict.items().len(), 3);
    assert_eq!(
        dict.insert("a.b", add_v(1)).err().unwrap().to_string(),
        "KeyError: module name can't contain \".\", got: a.b"
    );
    dict.clear();
    assert!(dict.is_empty() && dict.named_modules().len() == 1);
    let from_pairs: ModuleDict = [("x", add_v(1)), ("y", add_v(2))].into_iter().collect();
    assert_eq!(from_pairs.keys(), ["x", "y"]);
}

#[test]
fn shared_module_dedups_in_traversal_but_not_in_state_dict() {
    let r = case("shared_module");
    let lin: Arc<dyn Module> = Arc::new(Linear::new(2, 2));
    let seq = Sequential::new().add(lin.clone()).add(lin.clone());
    let names = |v: Vec<String>| v;
    assert_eq!(names(seq.named_modules().into_iter().map(|(n, _)| n).collect()), strings(&r["named_modules"]));
    assert_eq!(names(seq.named_parameters().into_iter().map(|(n, _)| n).collect()), strings(&r["named_parameters"]));
    assert_eq!(names(seq.state_dict().into_iter().map(|(n, _)| n).collect()), strings(&r["state_dict_keys"]));
    // Forward still applies the shared module twice.
    let x = Tensor::randn(&[3, 2]);
    let twice = lin.call(&lin.call(&x));
    assert!(seq.call(&x).allclose(&twice, 1e-6, 1e-6));
}

#[test]
fn linear_stack_repr() {
    let seq = Sequential::new().add(Linear::new(784, 256)).add(ReLU::new()).add(Linear::new(256, 10));
    assert_eq!(seq.repr(), case("linear_repr").as_str().unwrap());
    assert_eq!(format!("{}", &seq as &dyn Module), seq.repr());
}

#[test]
fn containers_nest_and_take_part_in_the_module_system() {
    let blocks: ModuleList = (0..2).map(|_| Sequential::new().add(Linear::new(4, 4)).add(ReLU::new())).collect();
    let heads = ModuleDict::new().add("cls", Linear::new(4, 3));
    let model = Sequential::new().add(blocks).add(heads);
    let params: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(params, ["0.0.0.weight", "0.0.0.bias", "0.1.0.weight", "0.1.0.bias", "1.cls.weight", "1.cls.bias"]);
    assert_eq!(model.get_submodule("0.1.1").unwrap().type_name(), "ReLU");
    // train/eval reach children held in containers.
    model.eval();
    assert!(model.named_modules().iter().all(|(_, m)| !m.training()));
    model.train(true);
    assert!(model.get_submodule("1.cls").unwrap().training());
    // State round-trips through containers.
    let state = model.state_dict();
    let other = Sequential::new()
        .add((0..2).map(|_| Sequential::new().add(Linear::new(4, 4)).add(ReLU::new())).collect::<ModuleList>())
        .add(ModuleDict::new().add("cls", Linear::new(4, 3)));
    other.load_state_dict(&state, true).unwrap();
    for ((_, a), (_, b)) in model.state_dict().iter().zip(other.state_dict()) {
        assert!(a.equal(&b));
    }
}

#[test]
fn sequential_calls_children_through_their_hooks() {
    let seq = Sequential::new().add(add_v(1)).add(add_v(2));
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let l = log.clone();
    let _h = seq[1].register_forward_hook(move |m, args, out| {
        l.lock().unwrap().push(format!("{} {} -> {}", m.repr(), args[0].item(), out.item()));
        Some(out.mul_scalar(10.0))
    });
    assert_eq!(seq.call(&one()).item(), 40.0);
    assert_eq!(*log.lock().unwrap(), ["AddV(value=2) 2 -> 4"]);
    // An empty Sequential is the identity.
    assert_eq!(Sequential::new().call(&one()).item(), 1.0);
}
