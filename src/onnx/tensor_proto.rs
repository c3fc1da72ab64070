//! `TensorProto` ↔ [`Buffer`]: decoding initializers and constants, encoding them on export.
//!
//! Only element types tracegrad has a dtype for are accepted (`INT32` widens to `i64`, which
//! keeps every value). Data may sit in `raw_data` (little-endian) or in the typed repeated
//! fields; either way its length must match the declared dims exactly, so a truncated or
//! inconsistent tensor is an error before anything is allocated from its dims.

use tracegrad_runtime::{Buffer, DType, Data};

use super::proto::{tensor_proto::DataType, TensorProto};

/// Most elements one tensor may declare (2^31): a hostile file cannot ask for more.
const MAX_ELEMENTS: usize = 1 << 31;

/// The tracegrad dtype of an ONNX element type.
pub(crate) fn dtype_of(code: i32) -> Result<DType, String> {
    match DataType::try_from(code) {
        Ok(DataType::Float) => Ok(DType::F32),
        Ok(DataType::Double) => Ok(DType::F64),
        Ok(DataType::Int64 | DataType::Int32) => Ok(DType::I64),
        Ok(DataType::Uint8) => Ok(DType::U8),
        Ok(DataType::Bool) => Ok(DType::Bool),
        Ok(other) => Err(format!("element type {} is not supported", other.as_str_name())),
        Err(_) => Err(format!("unknown element type code {code}")),
    }
}

/// Checked element count of declared dims.
pub(crate) fn dims_to_shape(dims: &[i64]) -> Result<Vec<usize>, String> {
    let mut n: usize = 1;
    let mut shape = Vec::with_capacity(dims.len());
    for &d in dims {
        let d = usize::try_from(d).map_err(|_| format!("negative dimension {d} in {dims:?}"))?;
        n = n.checked_mul(d).filter(|&n| n <= MAX_ELEMENTS).ok_or_else(|| format!("dims {dims:?} are too large"))?;
        shape.push(d);
    }
    Ok(shape)
}

fn check_len(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what} holds {got} elements but its dims declare {want}"))
    }
}

fn from_raw(raw: &[u8], code: DataType, n: usize) -> Result<Data, String> {
    let width = match code {
        DataType::Float | DataType::Int32 => 4,
        DataType::Double | DataType::Int64 => 8,
        _ => 1,
    };
    if raw.len() != n * width {
        return Err(format!("raw_data has {} bytes but its dims and type need {}", raw.len(), n * width));
    }
    let words = |w: usize| raw.chunks_exact(w);
    Ok(match code {
        DataType::Float => Data::F32(words(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        DataType::Int32 => Data::I64(words(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()),
        DataType::Double => {
            Data::F64(words(8).map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect())
        }
        DataType::Int64 => {
            Data::I64(words(8).map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect())
        }
        DataType::Bool => Data::Bool(raw.iter().map(|&b| b != 0).collect()),
        _ => Data::U8(raw.to_vec()),
    })
}

fn from_fields(t: &TensorProto, code: DataType, n: usize) -> Result<Data, String> {
    Ok(match code {
        DataType::Float => {
            check_len("float_data", t.float_data.len(), n)?;
            Data::F32(t.float_data.clone())
        }
        DataType::Double => {
            check_len("double_data", t.double_data.len(), n)?;
            Data::F64(t.double_data.clone())
        }
        DataType::Int64 => {
            check_len("int64_data", t.int64_data.len(), n)?;
            Data::I64(t.int64_data.clone())
        }
        DataType::Int32 => {
            check_len("int32_data", t.int32_data.len(), n)?;
            Data::I64(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        DataType::Bool => {
            check_len("int32_data", t.int32_data.len(), n)?;
            Data::Bool(t.int32_data.iter().map(|&v| v != 0).collect())
        }
        _ => {
            check_len("int32_data", t.int32_data.len(), n)?;
            let bytes =
                t.int32_data.iter().map(|&v| u8::try_from(v).map_err(|_| format!("uint8 value {v} out of range")));
            Data::U8(bytes.collect::<Result<_, _>>()?)
        }
    })
}

/// Decodes a tensor; errors name what is wrong (the caller adds the tensor's name).
pub(crate) fn to_buffer(t: &TensorProto) -> Result<Buffer, String> {
    if t.data_location == Some(super::proto::tensor_proto::DataLocation::External as i32) || !t.external_data.is_empty()
    {
        return Err("external data is not supported".into());
    }
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    dtype_of(t.data_type())?;
    let code = DataType::try_from(t.data_type()).map_err(|_| "unknown element type".to_string())?;
    let shape = dims_to_shape(&t.dims)?;
    let n: usize = shape.iter().product();
    let data = match &t.raw_data {
        Some(raw) => from_raw(raw, code, n)?,
        None => from_fields(t, code, n)?,
    };
    Ok(Buffer::new(data, &shape))
}
/// The ONNX element type of a tracegrad dtype.
pub(crate) fn onnx_type(d: DType) -> DataType {
    match d {
        DType::F32 => DataType::Float,
        DType::F64 => DataType::Double,
        DType::I64 => DataType::Int64,
        DType::U8 => DataType::Uint8,
        DType::Bool => DataType::Bool,
    }
}

/// Encodes a buffer as a named tensor (`raw_data`, little-endian).
pub(crate) fn from_buffer(name: &str, b: &Buffer) -> TensorProto {
    let raw: Vec<u8> = match b.data() {
        Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::U8(v) => v.clone(),
        Data::Bool(v) => v.iter().map(|&x| x as u8).collect(),
    };
    TensorProto {
        dims: b.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(onnx_type(b.dtype()) as i32),
        name: Some(name.to_string()),
        raw_data: Some(raw),
        ..Default::default()
    }
}
