// Reading Hugging Face safetensors checkpoints, single-file or sharded.
//
// A .safetensors file: 8 bytes little-endian header length N, N bytes of
// JSON ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// optional "__metadata__"}), then the tensor data; offsets are relative to
// the data start. A sharded checkpoint adds model.safetensors.index.json,
// whose "weight_map" names each tensor's shard.
//
// Every header is validated when the file is opened (offsets inside the file,
// byte counts = shape x dtype size); tensors are read one at a time, so a
// large checkpoint never sits in host memory whole. Host-only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"
#include "half_bits.hpp"

namespace llama {

enum class TensorDType { F16, BF16, F32 };

inline const char* dtype_name(TensorDType t) {
  switch (t) {
    case TensorDType::F16: return "F16";
    case TensorDType::BF16: return "BF16";
    case TensorDType::F32: return "F32";
  }
  return "?";
}
inline size_t dtype_bytes(TensorDType t) { return t == TensorDType::F32 ? 4 : 2; }

struct TensorInfo {
  std::string name;
  TensorDType dtype = TensorDType::F16;
  std::vector<int64_t> shape;
  uint64_t file_offset = 0;  // absolute, in the file
  uint64_t bytes = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// One .safetensors file: its validated header, and tensors read on demand.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path) : path_(path) {
    f_.open(path, std::ios::binary);
    if (!f_) throw std::runtime_error(path + ": cannot open safetensors file");
    f_.seekg(0, std::ios::end);
    const uint64_t file_size = uint64_t(f_.tellg());
    f_.seekg(0);
    if (file_size < 8) fail("file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
    unsigned char len_bytes[8];
    f_.read(reinterpret_cast<char*>(len_bytes), 8);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
    if (header_len > file_size - 8)
      fail("header length " + std::to_string(header_len) + " runs past the end of the file (" +
           std::to_string(file_size) + " bytes)");
    if (header_len > (uint64_t(100) << 20)) fail("header length " + std::to_string(header_len) + " is implausibly large");
    std::string header(size_t(header_len), '\0');
    f_.read(&header[0], std::streamsize(header_len));
    if (!f_) fail("cannot read the header");

    const uint64_t data_start = 8 + header_len, data_size = file_size - data_start;
    const Json j = Json::parse(header, path + " (header)");
    if (!j.is_object()) fail("header is not a JSON object");
    for (const auto& [name, entry] : j.as_object()) {
      if (name == "__metadata__") continue;
      tensors_[name] = parse_entry(name, entry, data_start, data_size);
    }
  }

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }

  /// The tensor's raw bytes, in its own dtype.
  std::vector<unsigned char> read_raw(const TensorInfo& t) {
    std::vector<unsigned char> buf(size_t(t.bytes));
    f_.clear();
    f_.seekg(std::streamoff(t.file_offset));
    f_.read(reinterpret_cast<char*>(buf.data()), std::streamsize(t.bytes));
    if (!f_) fail("cannot read tensor " + t.name);
    return buf;
  }

  /// The tensor as fp16 bits (bf16 and fp32 converted, round to nearest even).
  /// `overflows` counts values too large for fp16 (they become +-inf).
  std::vector<uint16_t> read_fp16(const TensorInfo& t, size_t* overflows = nullptr) {
    const std::vector<unsigned char> raw = read_raw(t);
    const size_t n = size_t(t.numel());
    std::vector<uint16_t> out(n);
    size_t over = 0;
    // safetensors is little-endian, as is every host CUDA runs on.
    if (t.dtype == TensorDType::F16) {
      std::memcpy(out.data(), raw.data(), n * 2);
    } else if (t.dtype == TensorDType::BF16) {
      for (size_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, raw.data() + 2 * i, 2);
        const float f = bf16_bits_to_float(b);
        out[i] = float_to_half_bits(f);
        over += ((out[i] & 0x7FFFu) == 0x7C00u && std::isfinite(f));
      }
    } else {
      for (size_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, raw.data() + 4 * i, 4);
        out[i] = float_to_half_bits(f);
        over += ((out[i] & 0x7FFFu) == 0x7C00u && std::isfinite(f));
      }
    }
    if (overflows) *overflows += over;
    return out;
  }

 private:
  std::string path_;
  std::ifstream f_;
  std::map<std::string, TensorInfo> tensors_;

  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error(path_ + ": " + what); }

  TensorInfo parse_entry(const std::string& name, const Json& e, uint64_t data_start, uint64_t data_size) const {
    const std::string ctx = "tensor \"" + name + "\": ";
    if (!e.is_object()) fail(ctx + "header entry is not an object");
    TensorInfo t;
    t.name = name;
    const std::string& dt = e.at("dtype").as_string();
    if (dt == "F16") t.dtype = TensorDType::F16;
    else if (dt == "BF16") t.dtype = TensorDType::BF16;
    else if (dt == "F32") t.dtype = TensorDType::F32;
    else fail(ctx + "dtype " + dt + " is not supported (F16, BF16 and F32 are)");
    uint64_t numel = 1;
    for (const Json& d : e.at("shape").as_array()) {
      const int64_t v = d.as_int64();
      if (v < 0) fail(ctx + "negative dimension in shape");
      t.shape.push_back(v);
      if (v != 0 && numel > (uint64_t(1) << 48) / uint64_t(v)) fail(ctx + "shape too large");
      numel *= uint64_t(v);
    }
    const auto& off = e.at("data_offsets").as_array();
    if (off.size() != 2) fail(ctx + "data_offsets must hold 2 numbers");
    const int64_t begin = off[0].as_int64(), end = off[1].as_int64();
    if (begin < 0 || end < begin) fail(ctx + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] are invalid");
    if (uint64_t(end) > data_size)
      fail(ctx + "data_offsets end " + std::to_string(end) + " is past the end of the data (" + std::to_string(data_size) +
           " bytes)");
    t.bytes = uint64_t(end - begin);
    if (t.bytes != numel * dtype_bytes(t.dtype))
      fail(ctx + "holds " + std::to_string(t.bytes) + " bytes but shape " + shape_string(t.shape) + " of " + dt + " needs " +
           std::to_string(numel * dtype_bytes(t.dtype)));
    t.file_offset = data_start + uint64_t(begin);
    return t;
  }
};

/// A checkpoint directory: model.safetensors.index.json + shards, or one
/// model.safetensors. Tensors are found by name across shards.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir) : dir_(dir) {
    const std::string index = dir + "/model.safetensors.index.json";
    if (std::ifstream(index).good()) {
      const Json j = Json::parse_file(index);
      for (const auto& [name, shard] : j.at("weight_map").as_object()) {
        const std::string& file = shard.as_string();
        if (file.find('/') != std::string::npos) throw std::runtime_error(index + ": shard name \"" + file + "\" has a '/'");
        auto it = shard_of_file_.find(file);
        if (it == shard_of_file_.end()) {
          it = shard_of_file_.emplace(file, shards_.size()).first;
          shards_.push_back(std::make_unique<SafetensorsFile>(dir + "/" + file));
        }
        if (!shards_[it->second]->find(name))
          throw std::runtime_error(index + ": maps \"" + name + "\" to " + file + ", which does not hold it");
        shard_of_tensor_[name] = it->second;
      }
    } else if (std::ifstream(dir + "/model.safetensors").good()) {
      shards_.push_back(std::make_unique<SafetensorsFile>(dir + "/model.safetensors"));
      for (const auto& kv : shards_[0]->tensors()) shard_of_tensor_[kv.first] = 0;
    } else {
      throw std::runtime_error(dir + ": neither model.safetensors.index.json nor model.safetensors found");
    }
  }

  bool has(const std::string& name) const { return shard_of_tensor_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const { return *shard(name).find(name); }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& kv : shard_of_tensor_) n.push_back(kv.first);
    return n;
  }

  /// Tensor `name` as fp16 bits; throws unless its shape is `expected_shape`.
  std::vector<uint16_t> load_fp16(const std::string& name, const std::vector<int64_t>& expected_shape) {
    SafetensorsFile& f = shard(name);
    const TensorInfo& t = *f.find(name);
    if (t.shape != expected_shape)
      throw std::runtime_error(f.path() + ": tensor \"" + name + "\" has shape " + shape_string(t.shape) + ", expected " +
                               shape_string(expected_shape));
    return f.read_fp16(t, &overflows_);
  }
  /// Values seen so far that were too large for fp16.
  size_t fp16_overflows() const { return overflows_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, size_t> shard_of_file_, shard_of_tensor_;
  size_t overflows_ = 0;

  SafetensorsFile& shard(const std::string& name) const {
    auto it = shard_of_tensor_.find(name);
    if (it == shard_of_tensor_.end()) throw std::runtime_error(dir_ + ": checkpoint has no tensor \"" + name + "\"");
    return *shards_[it->second];
  }
};

}  // namespace llama
