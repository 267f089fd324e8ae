// The model hyper-parameters from a Hugging Face config.json, for the
// Llama family (llama, mistral, qwen2): RMSNorm, RoPE, GQA attention with
// optional q/k/v/o biases, SwiGLU MLP. Anything the example would compute
// wrongly (other rope scalings, partial rotary, other activations) or that
// kvcomp or the fp16 comparison cache does not support (head_dim, GQA ratio) is rejected here with a
// message naming the field. Host-only.
#pragma once

#include <stdexcept>
#include <string>

#include "json.hpp"

namespace llama {

struct ModelConfig {
  std::string model_type;
  int hidden = 0;           // hidden_size
  int layers = 0;           // num_hidden_layers
  int q_heads = 0;          // num_attention_heads
  int kv_heads = 0;         // num_key_value_heads
  int head_dim = 0;         // head_dim, else hidden / q_heads
  int intermediate = 0;     // intermediate_size (SwiGLU width)
  int vocab = 0;            // vocab_size
  int max_positions = 0;    // max_position_embeddings
  int context = 0;          // tokens this example may use: max_positions, or less under a sliding window
  float rms_eps = 1e-6f;    // rms_norm_eps
  float rope_theta = 10000.f;
  bool tie_word_embeddings = false;

  static ModelConfig from_json(const Json& j, const std::string& source) {
    auto bad = [&](const std::string& what) { return std::runtime_error(source + ": " + what); };
    ModelConfig c;
    c.model_type = j.find_value("model_type") ? j.at("model_type").as_string() : "";
    if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2")
      throw bad("model_type \"" + c.model_type + "\" is not supported (llama, mistral and qwen2 are)");
    c.hidden = j.at("hidden_size").as_int();
    c.layers = j.at("num_hidden_layers").as_int();
    c.q_heads = j.at("num_attention_heads").as_int();
    c.kv_heads = j.find_value("num_key_value_heads") ? j.at("num_key_value_heads").as_int() : c.q_heads;
    c.intermediate = j.at("intermediate_size").as_int();
    c.vocab = j.at("vocab_size").as_int();
    c.max_positions = j.at("max_position_embeddings").as_int();
    if (const Json* e = j.find_value("rms_norm_eps")) c.rms_eps = float(e->as_double());
    if (const Json* t = j.find_value("tie_word_embeddings")) c.tie_word_embeddings = t->as_bool();
    if (c.hidden <= 0 || c.layers <= 0 || c.q_heads <= 0 || c.kv_heads <= 0 || c.intermediate <= 0 || c.vocab <= 0 ||
        c.max_positions <= 0)
      throw bad("sizes must be positive");
    c.head_dim = j.find_value("head_dim") ? j.at("head_dim").as_int() : c.hidden / c.q_heads;

    if (const Json* act = j.find_value("hidden_act"); act && act->as_string() != "silu")
      throw bad("hidden_act \"" + act->as_string() + "\" is not supported (silu is)");
    if (const Json* mb = j.find_value("mlp_bias"); mb && mb->as_bool()) throw bad("mlp_bias true is not supported");
    if (const Json* p = j.find_value("partial_rotary_factor"); p && p->as_double() != 1.0)
      throw bad("partial_rotary_factor " + std::to_string(p->as_double()) + " is not supported (1.0 is)");

    // RoPE: transformers 5 puts theta and type in rope_parameters; older configs
    // use top-level rope_theta and rope_scaling.
    if (const Json* t = j.find_value("rope_theta")) c.rope_theta = float(t->as_double());
    for (const char* key : {"rope_parameters", "rope_scaling"}) {
      const Json* rp = j.find_value(key);
      if (!rp) continue;
      if (!rp->is_object()) throw bad(std::string(key) + " must be an object");
      if (const Json* t = rp->find_value("rope_theta")) c.rope_theta = float(t->as_double());
      const Json* type = rp->find_value("rope_type");
      if (!type) type = rp->find_value("type");
      if (type && type->as_string() != "default")
        throw bad(std::string(key) + " type \"" + type->as_string() +
                  "\" is not supported (only unscaled rope, type \"default\")");
      if (!type && std::string(key) == "rope_scaling" && rp->find_value("factor"))
        throw bad("rope_scaling with a factor is not supported (only unscaled rope)");
    }
    if (!(c.rope_theta > 0)) throw bad("rope_theta must be positive");

    // A sliding window shorter than the context would change attention: use
    // only as many tokens as the window holds, so full attention stays exact.
    c.context = c.max_positions;
    const Json* use_sw = j.find_value("use_sliding_window");
    if (const Json* sw = j.find_value("sliding_window"); sw && (!use_sw || use_sw->as_bool()))
      if (sw->as_int() > 0 && sw->as_int() < c.context) c.context = sw->as_int();

    // What kvcomp supports (kvcomp::Config checks the same, later and less clearly).
    if (c.head_dim != 64 && c.head_dim != 128)
      throw bad("head_dim " + std::to_string(c.head_dim) + " is not supported by this example's fp16 comparison "
                "cache (64 and 128 are; kvcomp itself takes 64, 96 and 128)");
    if (c.q_heads % c.kv_heads != 0) throw bad("num_attention_heads must be a multiple of num_key_value_heads");
    const int group = c.q_heads / c.kv_heads;
    if (group != 1 && group != 2 && group != 4 && group != 8)
      throw bad("num_attention_heads / num_key_value_heads = " + std::to_string(group) +
                " is not supported by this example's fp16 comparison cache (1, 2, 4 and 8 are; kvcomp itself "
                "takes 1..8)");
    return c;
  }

  static ModelConfig from_dir(const std::string& dir) {
    const std::string path = dir + "/config.json";
    return from_json(Json::parse_file(path), path);
  }
};

}  // namespace llama
