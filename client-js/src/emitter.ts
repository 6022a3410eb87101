/** A small typed event emitter: `on` returns the function that unsubscribes. */
export type Listener<T> = (value: T) => void;

export class Emitter<Events extends object> {
  private listeners: { [K in keyof Events]?: Set<Listener<Events[K]>> } = {};

  on<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    const set = (this.listeners[event] ??= new Set());
    set.add(listener);
    return () => set.delete(listener);
  }

  protected emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const listener of [...(this.listeners[event] ?? [])]) {
      try {
        listener(value);
      } catch (err) {
        // One broken subscriber must not stop the others or the connection.
        console.error("cellgate: a listener failed", err);
      }
    }
  }
}
