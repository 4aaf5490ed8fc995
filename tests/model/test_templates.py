"""Phi-3's chat templates: recognised through whitespace, training twins that render the same
tokens with the real Phi-3 tokenizer, and a loss that covers each reply and its <|end|>."""

import pytest
import torch
from transformers import AutoTokenizer

from phi3ops.data.demo import generate_conversations
from phi3ops.errors import ConfigError, TemplateError
from phi3ops.model.templates import (
    KNOWN,
    PHI3_2024_04_TEMPLATE,
    PHI3_TEMPLATE,
    plan_training_template,
    recognise,
    resolve_setting,
)

END, ENDOFTEXT = 32007, 32000
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}")


def reformatted(template: str) -> str:
    """The same template as someone might copy it: spaces inside tags, a line per block tag."""
    return (template.replace("{%", "{%  ").replace("%}", " %}\n").replace("{{", "{{ ")
            .replace("}}", "  }}").replace("==", " == "))


@pytest.fixture(scope="module")
def phi3_tokenizer(phi3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(phi3_tokenizer_dir)


@pytest.mark.parametrize("known", KNOWN, ids=lambda t: t.name)
def test_known_templates_are_recognised_through_whitespace(known):
    assert recognise(known.original) is known
    assert recognise(known.training) is known
    assert recognise(reformatted(known.original)) is known
    assert reformatted(known.original) != known.original


def test_a_template_that_renders_other_text_is_not_recognised():
    assert recognise(PHI3_TEMPLATE.replace("'<|user|>\n'", "'<|user|> \n'")) is None
    assert recognise(CHATML) is None


def test_unknown_template_without_markers_stops_with_the_fix():
    with pytest.raises(TemplateError) as err:
        plan_training_template(CHATML, assistant_only_loss=True)
    assert "model.chat_template" in str(err.value) and "assistant_only_loss: false" in str(
        err.value)
    assert plan_training_template(CHATML, assistant_only_loss=False).training is None
    marked = (  # unknown, but with markers: the user's own training template
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
              "{% endfor %}")
    assert plan_training_template(marked, assistant_only_loss=True).training == marked
    with pytest.raises(TemplateError, match="has no chat template"):
        plan_training_template(None, assistant_only_loss=True)


def test_chat_template_setting_takes_a_name_a_file_or_the_template(tmp_path):
    assert resolve_setting("phi3-2024-04", tmp_path) == PHI3_2024_04_TEMPLATE
    (tmp_path / "mine.jinja").write_text(CHATML)
    assert resolve_setting("mine.jinja", tmp_path) == CHATML
    assert resolve_setting(CHATML, tmp_path) == CHATML
    with pytest.raises(ConfigError, match="not found"):
        resolve_setting("missing.jinja", tmp_path)
    with pytest.raises(ConfigError, match="neither a known template"):
        resolve_setting("phi-3", tmp_path)


def test_drops_system_turns_is_said_with_the_count():
    plan = plan_training_template(PHI3_2024_04_TEMPLATE, assistant_only_loss=True)
    assert plan.system_note(0, 10) is None
    assert "3 of 10 conversations" in plan.system_note(3, 10)
    assert plan_training_template(PHI3_TEMPLATE, True).system_note(3, 10) is None


@pytest.mark.parametrize("known", KNOWN, ids=lambda t: t.name)
def test_training_twin_renders_the_same_tokens_on_the_demo_data(phi3_tokenizer, known):
    conversations = [row["messages"] for row in generate_conversations(300)]
    assert any(m["role"] == "system" for c in conversations for m in c)
    assert any(len(c) > 3 for c in conversations), "multi-turn conversations are covered"
    for messages in conversations:
        for prompt in (messages, messages[:-1]):  # training rows, and generation prompts
            original, twin = (phi3_tokenizer.apply_chat_template(
                prompt, chat_template=template, add_generation_prompt=prompt is not messages)
                for template in (known.original, known.training))
            assert twin == original


@pytest.mark.parametrize("known", KNOWN, ids=lambda t: t.name)
def test_loss_covers_each_reply_and_its_end_token_and_nothing_else(phi3_tokenizer, known):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of Peru?"},
                {"role": "assistant", "content": "Lima."},
                {"role": "user", "content": "And of Chile?"},
                {"role": "assistant", "content": "Santiago."}]
    encoded = phi3_tokenizer.apply_chat_template(
        messages, chat_template=known.training, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    learned = [token for token, m in zip(ids, mask, strict=True) if m]
    runs = [run for run in "".join(map(str, mask)).split("0") if run]
    ends = [i for i, m in enumerate(mask) if m and (i + 1 == len(mask) or not mask[i + 1])]
    # Each reply, then its closing <|end|>: what the model must learn to say and stop on.
    assert len(runs) == 2 and [ids[i] for i in ends] == [END, END]
    assert phi3_tokenizer.decode(learned) == "Lima.<|end|>Santiago.<|end|>"
    unlearned = phi3_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Peru" in unlearned and "Chile" in unlearned
    assert ENDOFTEXT not in learned  # pad is eos: padding can never hide a reply's tokens


@pytest.mark.parametrize("known", KNOWN, ids=lambda t: t.name)
def test_trl_labels_each_reply_and_its_end_and_padding_hides_none_of_it(
        phi3_tokenizer, known, tmp_path):
    """Through TRL's own tokenization and collator, with pad = eos and a batch that pads."""
    from datasets import Dataset
    from transformers import Phi3Config, Phi3ForCausalLM
    from trl import SFTTrainer

    from phi3ops.config import TrainingConfig
    from phi3ops.train.trainer import build_sft_config

    long = [{"role": "user", "content": "Name three capitals."},
            {"role": "assistant", "content": "Lima, Paris and Tokyo."},
            {"role": "user", "content": "One more?"}, {"role": "assistant", "content": "Rome."}]
    short = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}]
    phi3_tokenizer.chat_template = plan_training_template(known.original, True).training
    model = Phi3ForCausalLM(Phi3Config(vocab_size=32064, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=2, pad_token_id=ENDOFTEXT))
    args = build_sft_config(TrainingConfig(learning_rate=1e-3, per_device_train_batch_size=2),
                            torch.float32, tmp_path)
    trainer = SFTTrainer(model=model, args=args, processing_class=phi3_tokenizer,
                         train_dataset=Dataset.from_list([{"messages": long},
                                                          {"messages": short}]))
    assert phi3_tokenizer.pad_token_id == ENDOFTEXT
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for row, replies in ((0, "Lima, Paris and Tokyo.<|end|>Rome.<|end|>"), (1, "Hello.<|end|>")):
        labels = batch["labels"][row]
        learned = labels[labels != -100].tolist()
        assert phi3_tokenizer.decode(learned) == replies
        assert learned.count(END) == replies.count("<|end|>")
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all(), "padding"
