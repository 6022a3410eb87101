/** The cell's code editor: CodeMirror 6 with Python, and the keys of a notebook. */
import {
  autocompletion,
  closeBrackets,
  closeBracketsKeymap,
  type CompletionContext,
  type CompletionResult,
  completionKeymap,
  startCompletion,
} from "@codemirror/autocomplete";
import { defaultKeymap, history, historyKeymap, indentLess, indentMore } from "@codemirror/commands";
import { python } from "@codemirror/lang-python";
import { bracketMatching, defaultHighlightStyle, indentOnInput, syntaxHighlighting } from "@codemirror/language";
import { EditorState, Prec } from "@codemirror/state";
import { EditorView, drawSelection, highlightActiveLine, keymap, lineNumbers } from "@codemirror/view";

export interface EditorHooks {
  run(): void;
  /** Completions from the kernel: the matches and the range they replace. */
  complete(code: string, pos: number): Promise<{ matches: string[]; start: number; end: number } | null>;
  inspect(code: string, pos: number): void;
  closeTip(): void;
}

export function createEditor(parent: HTMLElement, doc: string, hooks: EditorHooks, label: string): EditorView {
  const kernelCompletions = async (ctx: CompletionContext): Promise<CompletionResult | null> => {
    if (!ctx.explicit) return null; // only on Tab: every keystroke would be a kernel round trip
    const found = await hooks.complete(ctx.state.doc.toString(), ctx.pos);
    if (!found || !found.matches.length) return null;
    return {
      from: found.start,
      to: found.end,
      options: found.matches.map((label) => ({ label })),
      filter: false,
    };
  };
  // Tab completes after a name or a dot, and indents anywhere else (as in Jupyter).
  const tab = (view: EditorView): boolean => {
    const { head, empty } = view.state.selection.main;
    const before = view.state.sliceDoc(Math.max(0, head - 1), head);
    if (empty && /[\w.]/.test(before)) return startCompletion(view);
    return indentMore(view);
  };
  const keys = Prec.highest(
    keymap.of([
      { key: "Shift-Enter", run: () => (hooks.run(), true) },
      { key: "Ctrl-Enter", run: () => (hooks.run(), true) },
      { key: "Mod-Enter", run: () => (hooks.run(), true) },
      {
        key: "Shift-Tab",
        run: (view) => {
          const { head, empty } = view.state.selection.main;
          if (!empty) return indentLess(view);
          hooks.inspect(view.state.doc.toString(), head);
          return true;
        },
      },
      { key: "Escape", run: () => (hooks.closeTip(), false) },
    ]),
  );
  return new EditorView({
    parent,
    state: EditorState.create({
      doc,
      extensions: [
        lineNumbers(),
        history(),
        drawSelection(),
        indentOnInput(),
        bracketMatching(),
        closeBrackets(),
        highlightActiveLine(),
        syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
        python(),
        autocompletion({ override: [kernelCompletions], activateOnTyping: false }),
        keys,
        keymap.of([
          ...closeBracketsKeymap,
          ...completionKeymap,
          { key: "Tab", run: tab },
          ...defaultKeymap,
          ...historyKeymap,
        ]),
        EditorView.contentAttributes.of({ "aria-label": label }),
      ],
    }),
  });
}
