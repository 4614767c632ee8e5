"""A reload keeps the tokenizer (the same vocabulary) and takes the new folder's chat template."""

import shutil

from transformers import AutoTokenizer

from server.engines.prompt import chat_prompt_ids, with_chat_template_of


def test_a_reloaded_tokenizer_renders_with_the_new_template_and_leaves_the_old_one_alone(tiny_model_path, tmp_path):
    old = AutoTokenizer.from_pretrained(tiny_model_path, local_files_only=True)
    new_folder = tmp_path / "new"
    shutil.copytree(tiny_model_path, new_folder)
    (new_folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    new = with_chat_template_of(old, new_folder)
    messages = [{"role": "user", "content": "hi"}]
    assert new.decode(chat_prompt_ids(new, messages)) == "[hi]"
    assert old.decode(chat_prompt_ids(old, messages)) != "[hi]"
