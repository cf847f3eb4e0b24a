"""The confirmation step of replay and discard, shared by the dashboard and the admin.

An action's button posts without ``confirm``: the answer is a page that says what will happen
(and, for a replay, why the row would be refused as it is) with a form that posts again with
``confirm=yes``. Only that second POST acts; a GET never does.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms

from safetynet import deadletter

__all__ = ["CONFIRM", "ReplayForm", "confirmed"]

#: The value of the ``confirm`` field the confirmation page posts.
CONFIRM = "yes"


def confirmed(data: Any) -> bool:
    """Whether a POST is the confirmation itself (not the first click on a button)."""
    return data.get("confirm") == CONFIRM


class ReplayForm(forms.Form):
    """Replace the stored arguments when replaying (JSON); left empty, the stored ones are sent."""

    confirm = forms.CharField(widget=forms.HiddenInput, initial=CONFIRM)
    args = forms.CharField(
        required=False, label="replacement args", widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text='a JSON list, e.g. [42, "ana@example.com"]; empty: the stored positional arguments')
    kwargs = forms.CharField(
        required=False, label="replacement kwargs", widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text='a JSON object, e.g. {"order_id": 42}; empty: the stored keyword arguments')

    def _parsed(self, name: str) -> Any:
        text = (self.cleaned_data.get(name) or "").strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError as error:
            raise forms.ValidationError(f"not JSON: {error}") from None

    def clean_args(self) -> Any:
        value = self._parsed("args")
        try:
            deadletter.replacement_arguments(value, None)
        except (TypeError, ValueError) as error:
            raise forms.ValidationError(str(error)) from None
        return value

    def clean_kwargs(self) -> Any:
        value = self._parsed("kwargs")
        try:
            deadletter.replacement_arguments(None, value)
        except (TypeError, ValueError) as error:
            raise forms.ValidationError(str(error)) from None
        return value
