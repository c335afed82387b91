from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_loads_and_tokenizer_round_trips(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    text = "Anne Elliot walked to Uppercross, naïvely."
    assert tok.decode(tok(text)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
