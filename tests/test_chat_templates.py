"""Chat templates of real tokenizers (Llama-2, Llama-3.1, Qwen3, Gemma-3): masks, prompts, stops, end to end.

For each family, the labelled tokens must decode to exactly the answers plus the end-of-turn token,
the inference prompt must be token for token what training put before each answer, and
`python main.py` must train a tiny model of that architecture on a conversational file.
"""

import hashlib
import json

import pytest

import chat_format as cf
import data_preparation as dp
from chat_families import FAMILIES, Unavailable, tokenizer_dir
from chat_families import tiny_model_dir as family_model_dir
from config import Config, parse_config
from conftest import PROJECT_DIR, run_main
from model_setup import load_tokenizer

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}]
SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
          {"role": "assistant", "content": "An apple."}]
SYSTEM_MULTI = [{"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "Who painted the Mona Lisa?"},
                {"role": "assistant", "content": "Leonardo da Vinci."},
                {"role": "user", "content": "Where is it now?"},
                {"role": "assistant", "content": "In the Louvre, in Paris."},
                {"role": "user", "content": "Since when?"},
                {"role": "assistant", "content": "Since 1797."}]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system": SYSTEM, "system_multi": SYSTEM_MULTI}


def available(name):
    try:
        return tokenizer_dir(name)
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tokenizers():
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_tokenizer(Config(model_name=str(available(name))))
        return loaded[name]

    return get


def messages_dataset(conversations):
    from datasets import Dataset

    return Dataset.from_dict({"messages": list(conversations)})


def tokenized_rows(tokenizer, conversations, answers_only=True, max_length=1024):
    """The rows training gets for these conversations, through the data pipeline."""
    cleaned, _ = dp.clean_dataset(messages_dataset(conversations), tokenizer=tokenizer)
    rows, _ = dp.tokenize_dataset(cleaned, tokenizer, max_length, answers_only)
    return [rows[i] for i in range(len(rows))]


def labelled_runs(row):
    """(start, token ids) of each run of consecutive tokens that carry a label."""
    runs, start = [], None
    for i, label in enumerate(row["labels"] + [-100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, row["input_ids"][start:i]))
            start = None
    return runs


def answers(conversation):
    return [m["content"] for m in conversation if m["role"] == "assistant"]


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", CONVERSATIONS)
def test_labels_are_exactly_the_answers_and_their_end_of_turn(tokenizers, family, kind):
    tokenizer, conversation = tokenizers(family), CONVERSATIONS[kind]
    end = FAMILIES[family].end_of_turn
    rows = tokenized_rows(tokenizer, [conversation])
    learnt = sorted(tokenizer.decode(ids) for row in rows for _, ids in labelled_runs(row))
    assert learnt == sorted(answer + end for answer in answers(conversation))
    for row in rows:  # the labels are the tokens themselves, shifted by the model, not anything else
        assert all(label in (-100, token) for token, label in zip(row["input_ids"], row["labels"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_text_loss_labels_every_token_but_the_first(tokenizers, family):
    tokenizer = tokenizers(family)
    (row,) = tokenized_rows(tokenizer, [SYSTEM], answers_only=False)
    assert row["labels"][1:] == row["input_ids"][1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_is_the_stop_token_and_never_padding(tokenizers, family):
    tokenizer = tokenizers(family)
    end_id = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    stops = cf.stop_token_ids(tokenizer)
    assert stops[0] == end_id and tokenizer.eos_token_id in stops
    assert tokenizer.pad_token_id not in stops and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id < len(tokenizer)  # an existing token: no embedding to add


@pytest.mark.parametrize("family", FAMILIES)
def test_one_bos_per_row(tokenizers, family):
    tokenizer = tokenizers(family)
    for row in tokenized_rows(tokenizer, CONVERSATIONS.values()):
        ids, bos = row["input_ids"], tokenizer.bos_token_id
        if family == "qwen3":
            assert bos is None
        elif family == "llama2":  # the guanaco format opens every turn with <s>
            assert ids[0] == bos and ids[1] != bos
        else:
            assert ids[0] == bos and ids.count(bos) == 1


# ---------------------------------------------------------------- the prompt at inference

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", CONVERSATIONS)
def test_inference_prompt_is_the_training_prefix_of_every_answer(tokenizers, family, kind):
    tokenizer, conversation = tokenizers(family), CONVERSATIONS[kind]
    rows = tokenized_rows(tokenizer, [conversation])
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt = cf.prompt_ids(tokenizer, conversation[:index])
        follows = [tokenizer.decode(ids) for row in rows for start, ids in labelled_runs(row)
                   if start == len(prompt) and row["input_ids"][:start] == prompt]
        assert follows == [message["content"] + FAMILIES[family].end_of_turn], (index, follows)


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_inference_prompt_is_the_templates_generation_prompt(tokenizers, family):
    tokenizer = tokenizers(family)
    for conversation in (SINGLE[:1], SYSTEM[:2], SYSTEM_MULTI[:4]):
        # Qwen3 without thinking writes an empty <think> block there, as training's last answer has it.
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
        assert cf.prompt_text(tokenizer, conversation) == expected


def test_llama2_tokenizer_speaks_the_seed_format(tokenizers):
    tokenizer = tokenizers("llama2")
    assert cf.chat_style(tokenizer).is_llama2
    assert cf.prompt_text(tokenizer, SYSTEM[:2]) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a fruit. [/INST]"


# ---------------------------------------------------------------- the default path is unchanged

def fingerprint(rows) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def test_bundled_text_rows_keep_their_tokens_on_the_llama2_tokenizer(tokenizers):
    """The seed's format, token for token: these fingerprints were taken on the code before chat
    templates existed (commit edc95d3), for the bundled data and the real Llama-2 tokenizer."""
    tokenizer = tokenizers("llama2")
    data, _ = dp.clean_dataset(dp.load_raw_dataset(str(PROJECT_DIR / "data" / "sample.jsonl")))
    for answers_only, length, expected in ((True, 256, "dc23fd849a09dccf"), (False, 256, "0ba0fd7e097ada3d"),
                                           (True, 64, "f42d11578ef9dcb3")):
        rows = [dp.tokenize_text(text, tokenizer, length, answers_only) for text in data["text"]]
        assert fingerprint(rows) == expected, (answers_only, length)
    train, held = dp.prepare_datasets(parse_config(["--preset", "tiny"]), tokenizer, printer=lambda line: None)
    prepared = [list(train["input_ids"]), list(train["labels"]), list(held["input_ids"]), list(held["labels"])]
    assert fingerprint(prepared) == "c2a59a0f3411113e"


@pytest.mark.parametrize("family", ["llama2", "tiny"])
def test_conversations_on_a_llama2_tokenizer_render_to_the_text_rows_tokens(tokenizers, tiny_model_dir, family):
    """The bundled `text` rows, turned into `messages`, give exactly the tokens of the rows themselves."""
    tokenizer = tokenizers("llama2") if family == "llama2" else load_tokenizer(parse_config(["--preset", "tiny"]))
    texts, _ = dp.clean_dataset(dp.load_raw_dataset(str(PROJECT_DIR / "data" / "sample.jsonl")))
    conversations = [cf.llama2_messages(text) for text in texts["text"]]
    assert [cf.llama2_text(c) for c in conversations] == list(texts["text"])
    from_text = dp.tokenize_dataset(texts, tokenizer, 256, True)[0]
    from_messages = dp.tokenize_dataset(dp.clean_dataset(messages_dataset(conversations))[0], tokenizer, 256, True)[0]
    assert from_messages["input_ids"] == from_text["input_ids"] and from_messages["labels"] == from_text["labels"]


def test_llama2_text_rows_train_a_template_model_in_its_own_format(tokenizers):
    """guanaco-style rows on Llama-3: the [INST] markup is gone; the answers are learnt with <|eot_id|>."""
    tokenizer = tokenizers("llama3")
    texts, _ = dp.clean_dataset(dp.load_raw_dataset(str(PROJECT_DIR / "data" / "sample.jsonl")), tokenizer=tokenizer)
    rows, _ = dp.tokenize_dataset(texts, tokenizer, 1024, True)
    for text, row in zip(texts["text"][:20], rows.select(range(20))):
        assert "[INST]" not in tokenizer.decode(row["input_ids"])
        learnt = [tokenizer.decode(ids) for _, ids in labelled_runs(row)]
        assert learnt == [answer + "<|eot_id|>" for answer in answers(cf.llama2_messages(text))]


# ---------------------------------------------------------------- rows a format cannot hold

@pytest.mark.parametrize("family", FAMILIES)
def test_a_control_token_inside_an_answer_is_a_bad_row(tokenizers, family):
    tokenizer, end = tokenizers(family), FAMILIES[family].end_of_turn
    broken = [SINGLE[0], {"role": "assistant", "content": f"Paris.{end} And more."}]
    with pytest.raises(dp.DataError) as err:
        dp.clean_dataset(messages_dataset([SINGLE, broken, MULTI]), tokenizer=tokenizer)
    assert "1 of 3 rows" in str(err.value) and "row 1: message 1 (assistant) contains" in str(err.value)
    cleaned, report = dp.clean_dataset(messages_dataset([SINGLE, broken, MULTI]), on_bad_rows="skip", tokenizer=tokenizer)
    assert list(cleaned[dp.SOURCE_ROW]) == [0, 2] and [i for i, _ in report.skipped] == [1]


def test_qwen3_reasoning_markup_in_an_answer_is_reported_not_mislabelled(tokenizers):
    tokenizer = tokenizers("qwen3")
    thinking = [SINGLE[0], {"role": "assistant", "content": "<think>\nFrance...\n</think>\n\nParis."}]
    with pytest.raises(dp.DataError, match=r"row 0: the model's chat template rewrites message 1"):
        dp.clean_dataset(messages_dataset([thinking]), tokenizer=tokenizer)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def conversational_file(tmp_path_factory):
    """The bundled rows as `messages`, with a system prompt on every fifth."""
    texts, _ = dp.clean_dataset(dp.load_raw_dataset(str(PROJECT_DIR / "data" / "sample.jsonl")))
    path = tmp_path_factory.mktemp("conversations") / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts["text"][:40]):
            messages = cf.llama2_messages(text)
            if i % 5 == 0 and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_main_trains_a_tiny_model_of_each_family_on_conversations(tmp_path, family, conversational_file):
    try:
        model = family_model_dir(family)
    except Unavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "run"
    proc = run_main(["--preset", "tiny", "--model_name", model, "--dataset_name", conversational_file,
                     "--output_dir", out, "--max_steps", "2", "--gradient_accumulation_steps", "1", "--eval_fraction", "0",
                     "--logging_steps", "1", "--report_prompts", "Hi", "--max_new_tokens", "4", "--report_to", "none",
                     "--save_steps", "0"])
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    end = FAMILIES[family].end_of_turn
    assert "data: 40 rows in conversational 'messages' format (detected from the columns)" in proc.stdout
    assert f"answers end with {end}" in proc.stdout
    architecture = FAMILIES[family].architecture
    assert f"lora: LoRA on q_proj v_proj (auto: PEFT's default for model type '{architecture}')" in proc.stdout
    adapter = out / "tiny-llama-finetune"
    assert sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((adapter / "run_config.json").read_text())["lora_target_modules"] == ["q_proj", "v_proj"]
    assert "Traceback" not in proc.stderr
