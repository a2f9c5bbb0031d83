// `outpost model push|list|show`: models, versions and per-hardware variants.
#include <iostream>

#include "cli/cli.h"
#include "common/durable_file.h"
#include "common/onnx/onnx_builder.h"
#include "common/units.h"

namespace outpost::cli {
namespace {

struct VariantArg {
  nlohmann::json selector = nlohmann::json::object();
  nlohmann::json needs = nlohmann::json::object();
  std::string file;
};

// "accelerator=gpu,arch=arm64,min_memory=2G=model.onnx": the file follows the last '=';
// min_memory and precision are needs of the variant, every other key selects devices.
Result<VariantArg> parse_variant(const std::string& text) {
  VariantArg arg;
  auto last = text.rfind('=');
  std::string selector = last == std::string::npos ? "" : text.substr(0, last);
  arg.file = last == std::string::npos ? text : text.substr(last + 1);
  if (arg.file.empty()) {
    return make_error(Errc::kInvalidArgument, "--variant " + text + ": expected SELECTOR=FILE",
                      "variant");
  }
  size_t start = 0;
  while (start < selector.size()) {
    size_t comma = selector.find(',', start);
    std::string pair =
        selector.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    auto eq = pair.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 >= pair.size()) {
      return make_error(Errc::kInvalidArgument,
                        "--variant " + text + ": selector part \"" + pair + "\" is not key=value",
                        "variant");
    }
    std::string key = pair.substr(0, eq), value = pair.substr(eq + 1);
    if (key == "min_memory") {
      auto bytes = parse_size_bytes(value);
      if (!bytes)
        return make_error(Errc::kInvalidArgument,
                          "--variant " + text + ": min_memory: " + bytes.error().message,
                          "variant");
      arg.needs["min_memory_mb"] = *bytes / (1024 * 1024);
    } else if (key == "min_memory_mb") {
      try {
        arg.needs["min_memory_mb"] = std::stoll(value);
      } catch (...) {
        return make_error(Errc::kInvalidArgument,
                          "--variant " + text + ": min_memory_mb must be a number", "variant");
      }
    } else if (key == "precision") {
      arg.needs["precision"] = value;
    } else {
      arg.selector[key] = value;
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return arg;
}

// "onnx opset 13" or, for a model importing no default-domain opset, its domains.
std::string opset_text(const nlohmann::json& metadata) {
  if (int64_t opset = int_of(metadata, "opset"); opset > 0) {
    return "onnx opset " + std::to_string(opset);
  }
  std::string domains;
  for (const auto& o : list_of(metadata, "opsets")) {
    domains += (domains.empty() ? "" : ", ") + text_of(o, "domain") + " " + text_of(o, "version");
  }
  return "onnx, no ai.onnx opset" + (domains.empty() ? "" : " (" + domains + ")");
}

}  // namespace

std::string describe_pushed_version(const std::string& name, const std::string& version,
                                    const nlohmann::json& answer) {
  const auto created = answer.is_object() ? answer.find("created") : answer.end();
  const bool was_created =
      created == answer.end() || !created->is_boolean() || created->get<bool>();
  std::string out =
      "model " + name + " " + version +
      (was_created ? " pushed" : " unchanged (already pushed with the same content)") + "\n";
  for (const auto& v : list_of(answer, "variants")) {
    const auto& md = object_of(v, "metadata");
    out += "  variant " +
           object_of(v, "selector").dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
           "  " + text_of(v, "artifact") + "  " + opset_text(md) + ", inputs " +
           std::to_string(list_of(md, "inputs").size()) + ", outputs " +
           std::to_string(list_of(md, "outputs").size()) + "\n";
  }
  return out;
}

void add_model_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* model = app.add_subcommand("model", "Models, versions and hardware variants");
  model->require_subcommand(1);

  struct PushArgs {
    std::string name, version;
    std::vector<std::string> variants;
  };
  auto args = std::make_shared<PushArgs>();
  auto* push = model->add_subcommand("push", "Upload a model version with one or more variants");
  push->add_option("NAME", args->name, "Model name, e.g. defect-net")->required();
  push->add_option("VERSION", args->version, "Semantic version, e.g. 1.4.0")->required();
  push->add_option(
          "--variant", args->variants,
          "SELECTOR=FILE; selector keys match device facts/labels (accelerator, arch, ...); "
          "min_memory=2G and precision=fp16 state needs. Repeatable.")
      ->required();
  push->footer(
      "Examples:\n"
      "  outpost model push defect-net 1.4.0 --variant accelerator=cpu=net.onnx\n"
      "  outpost model push defect-net 1.4.0 --variant accelerator=gpu,min_memory=2G=net-fp16.onnx "
      "\\\n"
      "                                      --variant accelerator=cpu=net-int8.onnx\n"
      "A version is immutable: pushing it again with other files is refused.");
  push->callback([&options, &exit_code, args] {
    Session session(options);
    nlohmann::json variants = nlohmann::json::array();
    for (const auto& text : args->variants) {
      auto variant = parse_variant(text);
      if (!variant) {
        exit_code = session.fail(variant.error());
        return;
      }
      auto uploaded = session.upload("/api/v1/artifacts", variant->file);
      if (!uploaded) {
        exit_code = session.fail(uploaded.error().with_context("uploading " + variant->file));
        return;
      }
      const std::string digest = text_of(*uploaded, "digest");
      if (digest.empty()) {
        exit_code = session.fail(
            Error{Errc::kInternal,
                  "uploading " + variant->file +
                      ": the server's answer has no digest: " + uploaded->dump().substr(0, 200),
                  ""});
        return;
      }
      variants.push_back({{"selector", variant->selector},
                          {"needs", variant->needs},
                          {"artifact", digest},
                          {"format", "onnx"}});
    }
    nlohmann::json body = {{"version", args->version}, {"variants", variants}};
    auto result =
        session.call("POST", "/api/v1/models/" + url_encode(args->name) + "/versions", body.dump());
    if (!result) {
      exit_code = session.fail(
          result.error().with_context("pushing model " + args->name + " " + args->version));
      return;
    }
    if (session.json_output()) {
      session.print_json(*result);
    } else {
      std::cout << describe_pushed_version(args->name, args->version, *result);
    }
    exit_code = kExitOk;
  });

  auto gen = std::make_shared<onnx::ClassifierSpec>();
  auto gen_out = std::make_shared<std::string>();
  auto* generate = model->add_subcommand(
      "gen", "Write a tiny ONNX classifier (Gemm-Relu-Gemm-Softmax) with seeded weights");
  generate->add_option("--out", *gen_out, "Output file")->required();
  generate->add_option("--inputs", gen->inputs, "Input features")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  generate->add_option("--hidden", gen->hidden, "Hidden units")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  generate->add_option("--classes", gen->classes, "Output classes")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  generate->add_option("--seed", gen->seed, "Weight seed: same seed, same model")
      ->capture_default_str();
  auto probe = std::make_shared<std::vector<double>>();
  generate
      ->add_option("--answer-for", *probe,
                   "Also print what the model answers for this input row (comma-separated "
                   "values, one per input feature): known outputs to check a server with")
      ->delimiter(',');
  generate->footer(
      "Example: outpost model gen --out m-1.0.0.onnx --seed 1 --answer-for 0.5,-1,2,0.25\n"
      "         outpost model gen --out m-1.1.0.onnx --seed 2");
  generate->callback([&options, &exit_code, gen, gen_out, probe] {
    Session session(options);
    std::vector<float> answer;
    if (!probe->empty()) {
      if (static_cast<int64_t>(probe->size()) != gen->inputs) {
        exit_code = session.fail(Error{Errc::kInvalidArgument,
                                       "--answer-for: " + std::to_string(probe->size()) +
                                           " values, the model has " + std::to_string(gen->inputs) +
                                           " inputs",
                                       "--answer-for"});
        return;
      }
      answer = onnx::classifier_reference(*gen, std::vector<float>(probe->begin(), probe->end()));
    }
    std::string bytes = onnx::build_classifier_onnx(*gen);
    if (auto written = write_file_durably(*gen_out, bytes); !written) {
      exit_code = session.fail(written.error());
      return;
    }
    if (session.json_output()) {
      session.print_json(
          {{"file", *gen_out},
           {"bytes", bytes.size()},
           {"inputs", gen->inputs},
           {"hidden", gen->hidden},
           {"classes", gen->classes},
           {"seed", gen->seed},
           {"answer", answer.empty() ? nlohmann::json(nullptr) : nlohmann::json(answer)}});
    } else {
      std::cout << "wrote " << *gen_out << " (" << bytes.size() << " bytes): input [batch, "
                << gen->inputs << "] FLOAT -> probabilities [batch, " << gen->classes << "], seed "
                << gen->seed << "\n";
      if (!answer.empty()) {
        std::cout << "it answers";
        for (float v : answer) std::cout << " " << v;
        std::cout << "\n";
      }
    }
    exit_code = kExitOk;
  });

  auto* list = model->add_subcommand("list", "List models and their versions");
  list->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/models", exit_code, "models");
    if (!result) return;
    Table table({"NAME", "LATEST", "VERSIONS"});
    for (const auto& m : list_of(*result, "models")) {
      std::string versions;
      for (const auto& v : list_of(m, "versions")) {
        versions += (versions.empty() ? "" : ", ") + (v.is_string() ? v.get<std::string>() : "?");
      }
      table.add({text_of(m, "name"), text_of(m, "latest"), versions});
    }
    std::cout << table.render();
    exit_code = kExitOk;
  });

  auto name = std::make_shared<std::string>();
  auto* show =
      model->add_subcommand("show", "Show a model's versions, variants and their inputs/outputs");
  show->add_option("NAME", *name, "Model name")->required();
  show->callback([&options, &exit_code, name] {
    Session session(options);
    auto result = session.fetch("/api/v1/models/" + url_encode(*name), exit_code);
    if (!result) return;
    std::cout << "Model: " << *name << "\n";
    auto dump = [](const nlohmann::json& j) {
      return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    };
    for (const auto& v : list_of(*result, "versions")) {
      std::cout << "  " << text_of(v, "version") << "\n";
      for (const auto& variant : list_of(v, "variants")) {
        const auto& md = object_of(variant, "metadata");
        std::cout << "    variant " << dump(object_of(variant, "selector")) << " needs "
                  << dump(object_of(variant, "needs")) << "\n      artifact "
                  << text_of(variant, "artifact") << "  " << opset_text(md) << "\n";
        // Deltas the server made to this artifact from earlier versions (issue 18).
        for (const auto& d : list_of(variant, "deltas")) {
          if (text_of(d, "state") == "ready") {
            const int64_t size = d.value("size", int64_t{0});
            const int64_t full = d.value("target_size", int64_t{0});
            std::cout << "      delta from " << text_of(d, "base") << "  " << format_size(size);
            if (full > 0) std::cout << " (" << (size * 100 + full / 2) / full << "% of full)";
            std::cout << "\n";
          } else {
            std::cout << "      no delta from " << text_of(d, "base") << ": "
                      << text_of(d, "detail") << "\n";
          }
        }
        for (const char* side : {"inputs", "outputs"}) {
          for (const auto& t : list_of(md, side)) {
            const auto shape = t.is_object() ? t.find("shape") : t.end();
            std::cout << "      " << (std::string(side) == "inputs" ? "in " : "out") << " "
                      << text_of(t, "name") << " " << text_of(t, "type") << " "
                      << (shape == t.end()   ? std::string("[]")
                          : shape->is_null() ? std::string("[...]")
                                             : dump(*shape))
                      << "\n";
          }
        }
      }
    }
    exit_code = kExitOk;
  });
}

}  // namespace outpost::cli
