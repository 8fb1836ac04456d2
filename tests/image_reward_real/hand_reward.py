"""Test-only, run by the ImageReward venv's python: build the package's ``ImageReward`` with
random weights (seed 0; the MLP's at a scale where rewards differ) and save its state dict as ``ImageReward.pt`` (the published file's
format), then load that file into a second model built with another seed (``strict=True``:
the file covers every tensor) and compute ImageReward's formula by hand from that model's
modules: image (bicubic resize to 224, CLIP normalisation) -> BLIP ViT embeddings -> BERT text
encoder over the prompt cut at 35 tokens, cross-attending to them -> [CLS] feature -> MLP ->
``(reward - mean) / std``; also the plugin's scorer file (``request["scorer"]``) called as the
in-process route calls it, with PIL images.  Reads a JSON request on stdin, writes one JSON object on stdout."""

import importlib
import importlib.util
import json
import sys

import numpy as np
import torch
from PIL import Image

request = json.load(sys.stdin)
module = importlib.import_module("ImageReward.ImageReward")
torch.manual_seed(0)
built = module.ImageReward(med_config=request["med_config"], device="cpu")
for layer in built.mlp.layers:  # the package's MLP init (std 1/769, bias 0) makes every reward -mean/std
    if isinstance(layer, torch.nn.Linear):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        torch.nn.init.normal_(layer.bias, std=0.5)
torch.save(built.state_dict(), request["weights"])
torch.manual_seed(1)
model = module.ImageReward(med_config=request["med_config"], device="cpu").eval()
model.load_state_dict(torch.load(request["weights"], map_location="cpu", weights_only=True), strict=True)

tokenizer = model.blip.tokenizer
mean, std = request["mean"], request["std"]
lengths, rewards, package = [], [], []
with torch.no_grad():
    for path, prompt in zip(request["images"], request["prompts"]):
        ids = tokenizer(prompt)["input_ids"]  # [CLS] ... [SEP], not cut
        lengths.append(len(ids))
        cut = ids if len(ids) <= 35 else ids[:34] + [tokenizer.sep_token_id]
        input_ids = torch.tensor([cut + [tokenizer.pad_token_id] * (35 - len(cut))])
        attention = torch.tensor([[1] * len(cut) + [0] * (35 - len(cut))])
        pixels = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
        pixels = (pixels - np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)) / np.array(
            [0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
        image = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]
        embeds = model.blip.visual_encoder(image)
        text = model.blip.text_encoder(input_ids, attention_mask=attention, encoder_hidden_states=embeds,
                                       encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                                       return_dict=True)
        reward = model.mlp(text.last_hidden_state[:, 0, :].float())
        rewards.append(float((reward - mean) / std))
        package.append(float(model.score(prompt, path)))
# The plugin's scorer file as the in-process route calls it (PIL images), with this venv's package.
spec = importlib.util.spec_from_file_location("diffeval_image_reward", request["scorer"])
scorer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scorer)
in_process = scorer.score([Image.open(p).convert("RGB") for p in request["images"]], request["prompts"],
                          weights=request["weights"], med_config=request["med_config"], device="cpu")
print(json.dumps({"rewards": rewards, "package_score": package, "scorer_in_process": in_process,
                  "token_lengths": lengths,
                  "package_mean_std": [model.mean, model.std], "vit_blocks": len(model.blip.visual_encoder.blocks),
                  "text_layers": len(model.blip.text_encoder.encoder.layer),
                  "parameters": sum(p.numel() for p in model.parameters())}))
